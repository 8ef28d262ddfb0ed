"""The paper's figures in the reproduce registry equal a copy kept here, typed independently from
../shared/papers/ (the tables' lines as the text has them, parsed here; prose figures by hand)."""

from __future__ import annotations

import re

from ensemble_kd.reproduce import ENTRIES

# AE-KD, 002_b13621cfb640b4fb.txt, Table 1 (CIFAR10 then CIFAR100; resnet20 columns, then MobileNetV2's).
AEKD_T1 = {
    "cifar10": r"""
1	93.94	91.84	91.84	91.86	91.86	93.94	75.77	75.77	77.07	77.07
5	95.27	91.94	92.50 (\uparrow 0.56)	91.96	92.58 (\uparrow 0.62)	95.27	76.11	77.32 (\uparrow 1.21)	78.19	81.16(\uparrow 2.97)
10	95.58	91.96	92.54 (\uparrow 0.58)	92.09	92.67 (\uparrow 0.58)	95.58	77.47	79.27 (\uparrow 1.80)	78.30	81.83(\uparrow 3.53)
15	95.75	92.01	92.55 (\uparrow 0.54)	92.18	92.89 (\uparrow 0.71)	95.75	77.96	80.17 (\uparrow 2.21)	78.51	82.14(\uparrow 3.63)
20	95.74	92.22	92.70 (\uparrow 0.48)	92.31	92.93 (\uparrow 0.62)	95.74	78.89	80.41 (\uparrow 1.52)	78.94	82.24(\uparrow 3.30)
25	95.78	92.50	92.74 (\uparrow 0.24)	92.50	93.01 (\uparrow 0.51)	95.78	79.25	80.70 (\uparrow 1.45)	80.60	82.56(\uparrow 1.96)
""",
    "cifar100": r"""
1	72.41	70.49	70.49	70.55	70.55	72.41	66.44	66.44	66.84	66.84
5	77.42	70.78	71.37 (\uparrow 0.59)	70.97	71.95 (\uparrow 0.98)	77.42	66.82	67.27 (\uparrow 0.45)	66.98	67.63(\uparrow 0.65)
10	79.15	70.84	71.40 (\uparrow 0.56)	71.26	71.99 (\uparrow 0.73)	79.15	66.90	67.47(\uparrow 0.57)	67.05	67.71 (\uparrow 0.66)
15	79.55	71.21	71.48 (\uparrow 0.27)	71.49	72.12 (\uparrow 0.63)	79.55	67.03	67.59 (\uparrow 0.56)	67.13	67.92 (\uparrow 0.79)
20	79.83	71.47	71.66 (\uparrow 0.19)	71.58	72.21 (\uparrow 0.63)	79.83	67.09	67.84 (\uparrow 0.75)	67.17	68.14 (\uparrow 0.97)
25	80.01	71.57	71.84 (\uparrow 0.27)	71.70	72.36 (\uparrow 0.66)	80.01	67.19	67.93 (\uparrow 0.74)	67.45	68.20 (\uparrow 0.75)
""",
}
# Table 2 (CIFAR10 columns, then CIFAR100's).
AEKD_T2 = r"""
1	93.94	92.58	92.58	92.49	92.49	72.41	73.58	73.58	73.61	73.61
5	95.27	92.67	92.88 (\uparrow 0.21)	92.64	93.47 (\uparrow 0.83)	77.42	74.39	74.88 (\uparrow 0.49)	74.58	75.02(\uparrow 0.44)
10	95.58	92.82	93.23 (\uparrow 0.41)	92.67	93.64 (\uparrow 0.97)	79.15	74.66	74.96 (\uparrow 0.30)	74.69	75.16(\uparrow 0.47)
15	95.75	92.89	93.71 (\uparrow 0.82)	92.77	93.66 (\uparrow 0.89)	79.55	74.74	75.14 (\uparrow 0.40)	74.75	75.37(\uparrow 0.62)
20	95.74	92.87	93.75 (\uparrow 0.88)	92.90	93.76 (\uparrow 0.86)	79.83	74.92	75.45 (\uparrow 0.53)	75.04	75.53(\uparrow 0.49)
25	95.78	93.73	94.20 (\uparrow 0.47)	93.13	93.88 (\uparrow 0.75)	80.01	75.04	75.62 (\uparrow 0.58)	75.10	75.69(\uparrow 0.59)
"""
AEKD_T3 = r"""
1	75.67	92.50	67.81	88.21	67.81	88.21
3	76.85	93.60	67.85	88.39	68.28 (\uparrow 0.43)	88.21 (\downarrow 0.18)
5	77.52	93.85	68.18	88.47	69.14 (\uparrow 0.96)	88.93 (\uparrow 0.46)
"""
AEKD_COLUMNS = ("Ens", "AVER", "AE-KD", "FitNets", "AE-KD*")

# Nam et al., 004_fe5b8fcb83649ac6.txt (± spreads dropped by the parser).
NAM = {
    "nam-t1-cifar10": r"""
DE-4 teacher	94.71	0.170	0.006	0.168	0.010
KD	93.70 $\pm$ 0.10	0.270 $\pm$ 0.004	0.042 $\pm$ 0.001	0.201 $\pm$ 0.003	0.011 $\pm$ 0.002
AE-KD	93.67 $\pm$ 0.05	0.278 $\pm$ 0.002	0.042 $\pm$ 0.000	0.205 $\pm$ 0.001	0.010 $\pm$ 0.001
KD + LatentBE	93.98 $\pm$ 0.20	0.263 $\pm$ 0.003	0.041 $\pm$ 0.002	0.194 $\pm$ 0.002	0.011 $\pm$ 0.002
+ ConfODS	93.95 $\pm$ 0.12	0.223 $\pm$ 0.007	0.032 $\pm$ 0.001	0.186 $\pm$ 0.004	0.008 $\pm$ 0.001
+ TDiv-SDiv	93.95 $\pm$ 0.01	0.205 $\pm$ 0.006	0.028 $\pm$ 0.001	0.181 $\pm$ 0.005	0.008 $\pm$ 0.002
""",
    "nam-t2-cifar100": r"""
DE-4 teacher	81.37	0.706	0.031	0.700	0.018
KD	79.09 $\pm$ 0.20	1.038 $\pm$ 0.011	0.130 $\pm$ 0.003	0.861 $\pm$ 0.007	0.046 $\pm$ 0.001
AE-KD	79.00 $\pm$ 0.39	1.033 $\pm$ 0.009	0.129 $\pm$ 0.004	0.859 $\pm$ 0.008	0.045 $\pm$ 0.004
KD + LatentBE	79.46 $\pm$ 0.20	0.993 $\pm$ 0.024	0.124 $\pm$ 0.004	0.837 $\pm$ 0.012	0.046 $\pm$ 0.005
+ ConfODS	79.27 $\pm$ 0.30	0.955 $\pm$ 0.008	0.115 $\pm$ 0.002	0.840 $\pm$ 0.007	0.048 $\pm$ 0.004
+ TDiv-SDiv	80.02 $\pm$ 0.07	0.792 $\pm$ 0.004	0.067 $\pm$ 0.001	0.772 $\pm$ 0.003	0.041 $\pm$ 0.003
""",
}
NAM_COLUMNS = ("ACC", "NLL", "ECE", "cNLL", "cECE")

# EnsembleNet, 003_8163fefb5247977e.txt, Tables 1a, 1b, 2 (figures only, the width configs dropped).
ENSNET = {
    "ensemblenet-t1a-resnet152": [("Baseline", "78.54%	94.05%"), ("λ=1 or μ=0", "77.74%	93.43%"),
                                  ("λ=0", "79.85%	94.98%"), ("λ=-1.5", "80.28%	95.27%"), ("μ=3", "80.58%	95.38%")],
    "ensemblenet-t1b-seresnet152": [("Baseline", "78.85%	94.25%"), ("λ=1 or μ=0", "78.83%	93.75%"),
                                    ("λ=0", "80.76%	95.33%"), ("λ=-1.5", "81.36%	95.67%"), ("μ=3", "81.75%	95.82%")],
    "ensemblenet-t2-youtube8m": [("Baseline", "87.93%	59.65%"), ("λ=0", "88.30%	60.06%"),
                                 ("λ=-0.5", "88.35%	60.06%"), ("μ=2", "88.36%	60.07%")],
}


def _numbers(line: str) -> list[float]:
    line = re.sub(r"\(\\(?:up|down)arrow [0-9.]+\)", "", line)  # AE-KD's improvement marks
    line = re.sub(r"\$\\pm\$ [0-9.]+", "", line)  # Nam et al.'s spreads
    return [float(x) for x in re.findall(r"\d+\.\d+", line)]


def _table(text: str) -> dict[str, list[float]]:
    rows = {}
    for line in text.strip().splitlines():
        label, rest = line.split("\t", 1)
        rows[label] = _numbers(rest)
    return rows


def _figures(name: str) -> dict[tuple[str, str], float | None]:
    return {(c.row, c.column): c.paper for c in ENTRIES[name].cells}


def test_aekd_tables_1_and_2():
    for dataset, text in AEKD_T1.items():
        rows = _table(text)
        for student, half in (("resnet20", slice(0, 5)), ("mobilenetv2", slice(5, 10))):
            got = _figures(f"aekd-t1-{dataset}-{student}")
            for M, values in rows.items():
                assert [got[M, c] for c in AEKD_COLUMNS] == values[half], (dataset, student, M)
    for dataset, half in (("cifar10", slice(0, 5)), ("cifar100", slice(5, 10))):
        got = _figures(f"aekd-t2-{dataset}")
        for M, values in _table(AEKD_T2).items():
            assert [got[M, c] for c in AEKD_COLUMNS] == values[half], (dataset, M)
    # Table 1's headers: "resnet20 (91.7)", "MobileNetV2 (75.97)", "resnet20 (69.06)", "MobileNetV2 (64.60)"
    for name, alone in (("aekd-t1-cifar10-resnet20", 91.7), ("aekd-t1-cifar10-mobilenetv2", 75.97),
                        ("aekd-t1-cifar100-resnet20", 69.06), ("aekd-t1-cifar100-mobilenetv2", 64.60)):
        assert _figures(name)["alone", "student"] == alone


def test_aekd_table_3_and_mixed_teachers():
    got = _figures("aekd-t3-imagenet")
    columns = [f"{c} {k}" for c in ("Ensemble", "AVER", "AE-KD") for k in ("top-1", "top-5")]
    for M, values in _table(AEKD_T3).items():
        assert [got[M, c] for c in columns] == values
    # "accuracy 74.31%, 75.61% and 74.64%" ... "AE-KD can achieve 70.16% accuracy while ... AVER only has 69.40%"
    mixed = _figures("aekd-mixed-cifar100")
    assert [mixed["teacher", t] for t in ("resnet110", "WRN-40-2", "vgg13")] == [74.31, 75.61, 74.64]
    assert (mixed["logits", "AVER"], mixed["logits", "AE-KD"]) == (69.40, 70.16)
    assert mixed["features", "FitNets"] is None and mixed["features", "AE-KD*"] is None


def test_nam_tables():
    for name, text in NAM.items():
        got = _figures(name)
        for row, values in _table(text).items():
            assert [got[row, c] for c in NAM_COLUMNS] == values, (name, row)


def test_meal_surviving_figures_and_lost_cells():
    # Figure 8: "MobileNet baseline: 10.70%", "VGG19-BN baseline: 6.34%", "DenseNet baseline: 3.76%";
    # introduction: shake-shake MEAL "2.54% test error", footnote "Shake-shake baseline is 2.86%";
    # section 6.3: max pooling "(6.32%)"; section 6.4: MEAL Plus "21.79%, Top-5 5.99%", the original
    # ResNet-50 "23.85%/7.13%", the traditional ensemble "22.76%/6.49%".
    t2 = _figures("meal-t2-cifar10")
    assert [t2[a, "Single"] for a in ("MobileNet", "VGG-19 w/ BN", "DenseNet-BC (k=24)", "Shake-Shake-26 2x96d")] \
        == [10.70, 6.34, 3.76, 2.86]
    assert t2["Shake-Shake-26 2x96d", "Our Ens."] == 2.54
    assert sum(v is not None for v in t2.values()) == 5  # every other cell of Table 2 was lost
    t1 = _figures("meal-t1-cifar10")
    assert t1["max-pool alignment", "error"] == 6.32 and t1["base model", "error"] == 6.34
    assert sum(v is not None for v in t1.values()) == 2
    assert all(v is None for v in _figures("meal-t3-cifar10").values())
    t4 = _figures("meal-t4-imagenet")
    assert (t4["ResNet-50", "top-1"], t4["ResNet-50", "top-5"]) == (23.85, 7.13)
    assert (t4["Traditional Ens.", "top-1"], t4["Traditional Ens.", "top-5"]) == (22.76, 6.49)
    assert t4["Ours (ResNet-50)", "top-1"] is None
    plus = _figures("meal-t4-imagenet-plus")
    assert (plus["Ours Plus (ResNet-50)", "top-1"], plus["Ours Plus (ResNet-50)", "top-5"]) == (21.79, 5.99)


def test_ensemblenet_tables_and_sizes():
    for name, rows in ENSNET.items():
        got = _figures(name)
        columns = ("GAP", "mAP") if "youtube8m" in name else ("top-1", "top-5")
        for row, text in rows:
            assert [got[row, c] for c in columns] == _numbers(text), (name, row)
    # #Params / #FLOPs: 60.1M 21.8B and 58.2M 21.0B (1a); 66.7M 21.9B and 64.5M 21.1B (1b); 229M 415M and 226M 410M (2)
    sizes = {n: [(s.params, s.flops) for s in ENTRIES[n].sizes] for n in ENSNET}
    assert sizes == {"ensemblenet-t1a-resnet152": [(60.1, 21.8), (58.2, 21.0)],
                     "ensemblenet-t1b-seresnet152": [(66.7, 21.9), (64.5, 21.1)],
                     "ensemblenet-t2-youtube8m": [(229.0, 0.415), (226.0, 0.410)]}


def test_every_paper_and_every_cell_is_checked_above():
    checked = {f"aekd-t1-{d}-{s}" for d in ("cifar10", "cifar100") for s in ("resnet20", "mobilenetv2")}
    checked |= {"aekd-t2-cifar10", "aekd-t2-cifar100", "aekd-t3-imagenet", "aekd-mixed-cifar100", *NAM, *ENSNET,
                "meal-t1-cifar10", "meal-t2-cifar10", "meal-t3-cifar10", "meal-t4-imagenet", "meal-t4-imagenet-plus"}
    assert set(ENTRIES) == checked
