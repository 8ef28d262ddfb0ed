"""Nam et al. (ICML 2022 poster summary), "Improving ensemble distillation with weight averaging and
diversifying perturbation": Tables 1 (CIFAR-10) and 2 (CIFAR-100) with a DE-4 teacher.

Figures typed from ../shared/papers/004_fe5b8fcb83649ac6.txt: ACC (%), NLL, ECE, cNLL, cECE, the
students' as mean over seeds. The summary gives no architecture or schedule: both come from the
authors' public code, cs-giung/distill-latentbe (configs/C100_WRN28x4*.yaml, scripts/train*.py).
Proxy-End2 is not implemented here: its row is listed, not run. LatentBE rows are the collapsed
network (one forward pass), as the paper's.
"""

from __future__ import annotations

from .entry import Cell, Entry

METRICS = ("acc", "nll", "ece", "cnll", "cece")
ROWS = ("KD", "AE-KD", "KD + LatentBE", "+ ConfODS", "+ TDiv-SDiv")

TABLE1 = {"DE-4 teacher": (94.71, 0.170, 0.006, 0.168, 0.010),
          "KD": (93.70, 0.270, 0.042, 0.201, 0.011),
          "AE-KD": (93.67, 0.278, 0.042, 0.205, 0.010),
          "Proxy-End2": (93.67, 0.270, 0.042, 0.200, 0.011),
          "KD + LatentBE": (93.98, 0.263, 0.041, 0.194, 0.011),
          "+ ConfODS": (93.95, 0.223, 0.032, 0.186, 0.008),
          "+ TDiv-SDiv": (93.95, 0.205, 0.028, 0.181, 0.008)}
TABLE2 = {"DE-4 teacher": (81.37, 0.706, 0.031, 0.700, 0.018),
          "KD": (79.09, 1.038, 0.130, 0.861, 0.046),
          "AE-KD": (79.00, 1.033, 0.129, 0.859, 0.045),
          "Proxy-End2": (78.75, 1.076, 0.138, 0.886, 0.046),
          "KD + LatentBE": (79.46, 0.993, 0.124, 0.837, 0.046),
          "+ ConfODS": (79.27, 0.955, 0.115, 0.840, 0.048),
          "+ TDiv-SDiv": (80.02, 0.792, 0.067, 0.772, 0.041)}
COLUMN = {"acc": "ACC", "nll": "NLL", "ece": "ECE", "cnll": "cNLL", "cece": "cECE"}
# Our sweep's variants; a LatentBE row's collapsed part is the paper's single network.
VARIANTS = {"KD": "KD", "AE-KD": "AE-KD", "KD + LatentBE": "LatentBE [collapsed]",
            "+ ConfODS": "LatentBE + ConfODS [collapsed]", "+ TDiv-SDiv": "LatentBE + TDiv-SDiv [collapsed]"}
CODE = ("WRN-28-4 (the authors' PreResNet, projection shortcuts), 200 epochs, 5 warm-up then cosine, lr "
        "0.1, batch 128, weight decay 5e-4, Nesterov, 45,000/5,000 train/validation split, KD alpha 1 at "
        "T 4, 4 student seeds: cs-giung/distill-latentbe (the summary states none of them)")


def _cells(table) -> tuple[Cell, ...]:
    cells = [Cell("DE-4 teacher", COLUMN[m], v, metric=m, teachers=("ensemble", 4))
             for m, v in zip(METRICS, table["DE-4 teacher"])]
    cells += [Cell(row, COLUMN[m], v, metric=m, variant=VARIANTS[row])
              for row in ROWS for m, v in zip(METRICS, table[row])]
    return tuple(cells)


def _entry(name, table, dataset, figures, config) -> Entry:
    return Entry(
        name=name, paper="Nam et al. 2022 (LatentBE)", table=table,
        rows="DE-4 WRN-28-4 teacher -> WRN-28-4: KD, AE-KD, KD + LatentBE, + ConfODS, + TDiv-SDiv; ACC, NLL, "
             "ECE, cNLL, cECE",
        config=config, cells=_cells(figures), num_classes=10 if dataset == "cifar10" else 100,
        input_shape=(3, 32, 32), train_images=45000, budget={"teachers.train.epochs": 200, "student.train.epochs": 200,
                                         "teachers.count": 4},
        notes=(CODE, "Proxy-End2 (Ryabinin et al.) is not implemented: its row is listed with the paper's "
               "figures, not run", "AE-KD's options are not in the summary or the code: C 0.6 and the KD "
               "weights of the authors' KD (CE 0, KD 1) are ours"))


ENTRIES = [
    _entry("nam-t1-cifar10", "Table 1 (CIFAR-10, DE-4)", "cifar10", TABLE1, "configs/papers/nam_t1_cifar10.yaml"),
    _entry("nam-t2-cifar100", "Table 2 (CIFAR-100, DE-4)", "cifar100", TABLE2, "configs/papers/nam_t2_cifar100.yaml"),
]
