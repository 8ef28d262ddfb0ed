"""AE-KD (Du et al., NeurIPS 2020, "Agree to disagree"): Tables 1-3 and the mixed-architecture result.

Figures typed from ../shared/papers/002_b13621cfb640b4fb.txt. Ens is the teachers' majority vote
(Table 1's caption); AVER is Eq. 7 with equal weights (CE 1 + 0.9 KD); FitNets adds the hints with
equal weights; AE-KD* is AE-KD on features. Top-1 accuracy (%), Table 3 also top-5.
"""

from __future__ import annotations

from .entry import Cell, Entry

SIZES = (1, 5, 10, 15, 20, 25)
COLUMNS = ("Ens", "AVER", "AE-KD", "FitNets", "AE-KD*")

# Table 1, per (dataset, student): one row per ensemble size, the five columns above.
TABLE1 = {
    ("cifar10", "resnet20"): ((93.94, 91.84, 91.84, 91.86, 91.86), (95.27, 91.94, 92.50, 91.96, 92.58),
                              (95.58, 91.96, 92.54, 92.09, 92.67), (95.75, 92.01, 92.55, 92.18, 92.89),
                              (95.74, 92.22, 92.70, 92.31, 92.93), (95.78, 92.50, 92.74, 92.50, 93.01)),
    ("cifar10", "mobilenetv2"): ((93.94, 75.77, 75.77, 77.07, 77.07), (95.27, 76.11, 77.32, 78.19, 81.16),
                                 (95.58, 77.47, 79.27, 78.30, 81.83), (95.75, 77.96, 80.17, 78.51, 82.14),
                                 (95.74, 78.89, 80.41, 78.94, 82.24), (95.78, 79.25, 80.70, 80.60, 82.56)),
    ("cifar100", "resnet20"): ((72.41, 70.49, 70.49, 70.55, 70.55), (77.42, 70.78, 71.37, 70.97, 71.95),
                               (79.15, 70.84, 71.40, 71.26, 71.99), (79.55, 71.21, 71.48, 71.49, 72.12),
                               (79.83, 71.47, 71.66, 71.58, 72.21), (80.01, 71.57, 71.84, 71.70, 72.36)),
    ("cifar100", "mobilenetv2"): ((72.41, 66.44, 66.44, 66.84, 66.84), (77.42, 66.82, 67.27, 66.98, 67.63),
                                  (79.15, 66.90, 67.47, 67.05, 67.71), (79.55, 67.03, 67.59, 67.13, 67.92),
                                  (79.83, 67.09, 67.84, 67.17, 68.14), (80.01, 67.19, 67.93, 67.45, 68.20)),
}
# Table 1's header: the student trained alone.
ALONE = {("cifar10", "resnet20"): 91.7, ("cifar10", "mobilenetv2"): 75.97,
         ("cifar100", "resnet20"): 69.06, ("cifar100", "mobilenetv2"): 64.60}
# Table 2: resnet56 -> resnet56.
TABLE2 = {
    "cifar10": ((93.94, 92.58, 92.58, 92.49, 92.49), (95.27, 92.67, 92.88, 92.64, 93.47),
                (95.58, 92.82, 93.23, 92.67, 93.64), (95.75, 92.89, 93.71, 92.77, 93.66),
                (95.74, 92.87, 93.75, 92.90, 93.76), (95.78, 93.73, 94.20, 93.13, 93.88)),
    "cifar100": ((72.41, 73.58, 73.58, 73.61, 73.61), (77.42, 74.39, 74.88, 74.58, 75.02),
                 (79.15, 74.66, 74.96, 74.69, 75.16), (79.55, 74.74, 75.14, 74.75, 75.37),
                 (79.83, 74.92, 75.45, 75.04, 75.53), (80.01, 75.04, 75.62, 75.10, 75.69)),
}
# Table 3, ImageNet, ResNet-50 teachers -> ResNet-18: (Ens top-1, top-5, AVER top-1, top-5, AE-KD top-1, top-5).
TABLE3 = {1: (75.67, 92.50, 67.81, 88.21, 67.81, 88.21), 3: (76.85, 93.60, 67.85, 88.39, 68.28, 88.21),
          5: (77.52, 93.85, 68.18, 88.47, 69.14, 88.93)}
# Section 4.1: resnet110 + WRN-40-2 + vgg13 teachers (74.31, 75.61, 74.64) -> resnet20, CIFAR-100.
MIXED = {"teachers": (74.31, 75.61, 74.64), "AVER": 69.40, "AE-KD": 70.16}

SCHEDULE = ("teachers (section 4.1): 240 epochs, lr 0.05 x0.1 at 150/180/210; resnet20: 350 epochs, lr 0.05 "
            "/10 every 50 from 150; MobileNetV2: the teachers' schedule at lr 0.01; batch 64, weight decay "
            "5e-4, Nesterov, C 0.6, beta 100 and the FitNets baseline's equal weights: the authors' code")


def variant(M: int, column: str) -> str:
    """The sweep variant of a column ("AE-KD*" would share AE-KD's folder: it is "AE-KD features")."""
    return f"M={M} {column.replace('*', ' features')}"


def sweep_cells(figures, sizes=SIZES) -> tuple[Cell, ...]:
    cells = []
    for M, row in zip(sizes, figures):
        for column, paper in zip(COLUMNS, row):
            if column == "Ens":
                cells.append(Cell(str(M), column, paper, teachers=("vote", M)))
            else:
                cells.append(Cell(str(M), column, paper, variant=variant(M, column)))
    return tuple(cells)


def _cifar(name, table, dataset, student, figures, config, epochs, alone=None) -> Entry:
    cells = sweep_cells(figures)
    if alone is not None:
        cells = (Cell("alone", "student", alone, variant="student alone"),) + cells
    return Entry(
        name=name, paper="AE-KD (Du et al. 2020)", table=table,
        rows=f"{dataset}, resnet56 x M -> {student}; M in 1, 5, 10, 15, 20, 25; "
             f"Ens, AVER, AE-KD, FitNets, AE-KD*",
        config=config, cells=cells, num_classes=10 if dataset == "cifar10" else 100, input_shape=(3, 32, 32),
        train_images=50000,
        budget={"teachers.train.epochs": 240, "student.train.epochs": epochs, "teachers.count": 25},
        notes=(SCHEDULE,))


DATASETS = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}
# Table 1's students: (our model, its epochs as section 4.1 gives them).
STUDENTS = {"resnet20": ("resnet20", "resnet20", 350), "mobilenetv2": ("MobileNetV2", "mobilenetv2_aekd", 240)}

ENTRIES = [
    *(_cifar(f"aekd-t1-{ds}-{s}", f"Table 1 ({DATASETS[ds]}, {label})", ds, arch, TABLE1[ds, s],
             f"configs/papers/aekd_t1_{ds}_{s}.yaml", epochs, ALONE[ds, s])
      for ds in DATASETS for s, (label, arch, epochs) in STUDENTS.items()),
    *(_cifar(f"aekd-t2-{ds}", f"Table 2 ({DATASETS[ds]}, resnet56 student)", ds, "resnet56", TABLE2[ds],
             f"configs/papers/aekd_t2_{ds}.yaml", 240) for ds in DATASETS),
    Entry(
        name="aekd-mixed-cifar100", paper="AE-KD (Du et al. 2020)", table="section 4.1, mixed teachers",
        rows="CIFAR-100, resnet110 + WRN-40-2 + vgg13 -> resnet20; AVER, AE-KD (logits), FitNets, AE-KD* (features)",
        config="configs/papers/aekd_mixed_cifar100.yaml",
        cells=(Cell("teacher", "resnet110", MIXED["teachers"][0], teachers=("member", 0)),
               Cell("teacher", "WRN-40-2", MIXED["teachers"][1], teachers=("member", 1)),
               Cell("teacher", "vgg13", MIXED["teachers"][2], teachers=("member", 2)),
               Cell("logits", "AVER", MIXED["AVER"], variant="AVER"),
               Cell("logits", "AE-KD", MIXED["AE-KD"], variant="AE-KD"),
               Cell("features", "FitNets", None, variant="FitNets"),
               Cell("features", "AE-KD*", None, variant="AE-KD features")),
        num_classes=100, input_shape=(3, 32, 32), train_images=50000,
        budget={"teachers.train.epochs": 240, "student.train.epochs": 350},
        notes=("the paper gives the logits variant's figures only; the features rows run with no figure to "
               "compare", SCHEDULE)),
    Entry(
        name="aekd-t3-imagenet", paper="AE-KD (Du et al. 2020)", table="Table 3 (ImageNet)",
        rows="ResNet-50 x M -> ResNet-18; M in 1, 3, 5; Ensemble, AVER, AE-KD; top-1 and top-5",
        config="configs/imagenet_aekd.yaml",
        cells=tuple(Cell(str(M), f"{column} {k}", value, metric="acc" if k == "top-1" else "top5",
                         **({"teachers": ("vote" if k == "top-1" else "ensemble", M)} if column == "Ensemble"
                            else {"variant": variant(M, column)}))
                    for M, row in TABLE3.items()
                    for (column, k), value in zip([(c, k) for c in ("Ensemble", "AVER", "AE-KD")
                                                   for k in ("top-1", "top-5")], row)),
        num_classes=1000, input_shape=(3, 224, 224), train_images=1281167,
        budget={"teachers.train.epochs": 90, "student.train.epochs": 90, "teachers.count": 5},
        notes=("the paper follows [21] (CCKD) for the ImageNet setting and states no schedule; ours is the "
               "standard 90-epoch step recipe at batch 256",
               "Ensemble top-1 is the majority vote (Table 1's symbols); a vote has no top-5: ours is the mean "
               "of probabilities")),
]
