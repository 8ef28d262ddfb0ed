"""EnsembleNet (Li, Ng & Natsev): Tables 1a, 1b (ImageNet) and 2 (YouTube-8M).

Typed from ../shared/papers/003_8163fefb5247977e.txt (the review version; its tables equal the
conference version's, 001). Parameters with batch norm folded; FLOPs from tensorflow.profiler, a
multiply and an add two ops. Table 3 (Kinetics, S3D-G) is its own issue.
"""

from __future__ import annotations

from .entry import Cell, Entry, Size

# row: (top-1, top-5)
TABLE1A = {"Baseline": (78.54, 94.05), "λ=1 or μ=0": (77.74, 93.43), "λ=0": (79.85, 94.98),
           "λ=-1.5": (80.28, 95.27), "μ=3": (80.58, 95.38)}
TABLE1B = {"Baseline": (78.85, 94.25), "λ=1 or μ=0": (78.83, 93.75), "λ=0": (80.76, 95.33),
           "λ=-1.5": (81.36, 95.67), "μ=3": (81.75, 95.82)}
# row: (GAP, mAP)
TABLE2 = {"Baseline": (87.93, 59.65), "λ=0": (88.30, 60.06), "λ=-0.5": (88.35, 60.06), "μ=2": (88.36, 60.07)}
IMAGENET_NOTES = (
    "section 4.1: lower two blocks shared, two branches of bottleneck widths (176, 352), ReLU6, label "
    "smoothing 0.1, lr 0.01 x0.2 every 60 epochs, batch 4096; the total epochs are not stated (ours: 180)",
    "not expressible here: color augmentation, subsampling in a block's last unit (our FLOPs are higher "
    "by that), normal(0.03) initialisation, l2 on batch norm gamma (README: EnsembleNet's options)")


def _rows(table, variants, metrics) -> tuple[Cell, ...]:
    return tuple(Cell(row, label, value, metric=metric, variant=variants[row])
                 for row, values in table.items() for (label, metric), value in zip(metrics, values))


TOP = (("top-1", "acc"), ("top-5", "top5"))
IMAGENET_VARIANTS = {"Baseline": "baseline", "λ=1 or μ=0": "ensembling λ=1", "λ=0": "ensembling λ=0",
                     "λ=-1.5": "ensembling λ=-1.5", "μ=3": "co-distillation μ=3"}

ENTRIES = [
    Entry(
        name="ensemblenet-t1a-resnet152", paper="EnsembleNet (Li et al.)", table="Table 1a (ImageNet, ResNet-152)",
        rows="ResNet-152 baseline; multi-headed (base (64, 128), 2 branches (176, 352)) with the ensembling "
             "loss λ = 1, 0, -1.5 and co-distillation μ = 3; top-1, top-5",
        config="configs/papers/ensemblenet_t1a_resnet152.yaml", cells=_rows(TABLE1A, IMAGENET_VARIANTS, TOP),
        num_classes=1000, input_shape=(3, 224, 224), train_images=1281167, budget={"student.train.epochs": 180},
        sizes=(Size("baseline", 60.1, 21.8), Size("co-distillation μ=3", 58.2, 21.0)),
        folded_params=True, flops_are_macs=False, notes=IMAGENET_NOTES,
        needs=("method.options branch_widths, label_smoothing (branch ensnet)",)),
    Entry(
        name="ensemblenet-t1b-seresnet152", paper="EnsembleNet (Li et al.)",
        table="Table 1b (ImageNet, SE-ResNet-152)",
        rows="SE-ResNet-152 baseline; multi-headed (base (64, 128), 2 branches (176, 352)) with the ensembling "
             "loss λ = 1, 0, -1.5 and co-distillation μ = 3; top-1, top-5",
        config="configs/papers/ensemblenet_t1b_seresnet152.yaml", cells=_rows(TABLE1B, IMAGENET_VARIANTS, TOP),
        num_classes=1000, input_shape=(3, 224, 224), train_images=1281167, budget={"student.train.epochs": 180},
        sizes=(Size("baseline", 66.7, 21.9), Size("co-distillation μ=3", 64.5, 21.1)),
        folded_params=True, flops_are_macs=False,
        notes=IMAGENET_NOTES + ("SE reduction ratio 16 with batch norm in the SE layers (the paper); timm's "
                                "seresnet152 has no batch norm there",),
        needs=("method.options branch_widths, label_smoothing (branch ensnet)", "multi-head base timm/seresnet152")),
    Entry(
        name="ensemblenet-t2-youtube8m", paper="EnsembleNet (Li et al.)", table="Table 2 (YouTube-8M, DBoF)",
        rows="DBoF baseline (cluster 4096, hidden 4096, MoE-5); multi-headed forked after pooling, branches "
             "hidden 3000 and MoE-3, λ = 0, -0.5 and μ = 2; GAP, mAP",
        config="configs/papers/ensemblenet_t2_youtube8m.yaml",
        cells=_rows(TABLE2, {"Baseline": "baseline DBoF", "λ=0": "ensembling λ=0", "λ=-0.5": "ensembling λ=-0.5",
                             "μ=2": "co-distillation μ=2"}, (("GAP", "gap"), ("mAP", "map"))),
        num_classes=3862, input_shape=(300, 1152), budget={"student.train.epochs": 10},
        sizes=(Size("baseline DBoF", 229.0, 0.415), Size("co-distillation μ=2", 226.0, 0.410)),
        folded_params=True, flops_are_macs=False,
        notes=("section 4.2: Adam, lr 0.005 x0.95 every 1,500,000 examples, batch 16 on each of 32 TPU cores, "
               "25 random frames of each video (data.frames_per_video); the epochs are not stated (ours: 10)",
               "trained on the train set and 90% of validate, evaluated on the other 10% in the paper; here "
               "validate is held out whole",
               "parameters: ours 227.2M and 238.2M against the paper's 229M and 226M (each of our branches "
               "has its own output context gate; README, EnsembleNet's options); the paper's FLOPs leave the "
               "frame-level layers out")),
]
