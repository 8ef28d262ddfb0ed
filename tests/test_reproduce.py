"""`ensemble-kd reproduce`: the listing, every entry's dry run at full size on the meta device, the
EnsembleNet parameter counts in the paper's convention, and one tiny end-to-end run per paper on
digits (or generated video features) ending in the paper's layout with the budget mark."""

from __future__ import annotations

import json

import pytest

from ensemble_kd.cli import main
from ensemble_kd.config import load_config
from ensemble_kd.reproduce import ENTRIES, find
from ensemble_kd.reproduce.run import budget_changes
from ensemble_kd.reproduce.show import plan


def test_listing_names_every_entry_with_its_config_figures_and_cost(capsys):
    assert main(["reproduce"]) == 0
    listing = capsys.readouterr().out
    for entry in ENTRIES.values():
        block = listing.split(f"\n{entry.name}\n" if not listing.startswith(entry.name) else entry.name, 1)[1]
        block = block.split("\n  cost:", 1)
        assert f"config:  {entry.config}" in block[0] and entry.table in block[0], entry.name
        assert entry.config_path.is_file(), entry.config
    assert "figures: Ours Plus (ResNet-50)/top-1 21.79" in listing
    assert "figures: no numeric cell survived in the text" in listing  # MEAL's Table 3
    assert "student 0.27M, 0.0408G MACs; 25 teachers (resnet56)" in listing  # resnet20 from 25 resnet56
    assert "training 8.4e+17 MACs in all" in listing  # below, by hand


def test_every_config_names_its_paper_table_and_matches_its_budget():
    for entry in ENTRIES.values():
        text = entry.config_path.read_text()
        config = load_config(entry.config_path)
        assert config.sweep.variants, entry.name
        head = text.split("\ndata:", 1)[0]
        assert ("Table" in head or "section" in head) and entry.paper.split(" ")[0] in head, entry.name
        assert "could not be checked offline" not in text
        for key, value in entry.budget.items():  # the config runs the paper's budget
            node = config
            for part in key.split("."):
                node = getattr(node, part)
            assert node == value, (entry.name, key)
        assert budget_changes(entry, config) == []
        variants = set(config.sweep.variants)
        for cell in entry.cells:  # every student cell has its sweep variant
            assert cell.variant is None or cell.variant.split(" [")[0] in variants, (entry.name, cell)


@pytest.mark.parametrize("name", list(ENTRIES))
def test_dry_run_builds_every_model_at_full_size(name, capsys, tmp_path):
    entry = find(name)
    code = main(["reproduce", name, "--dry-run", f"run.dir={tmp_path / 'runs'}"])
    captured = capsys.readouterr()
    assert code == 0, (f"{name}: the dry run failed ({captured.err.strip()}); "
                       f"it needs {', '.join(entry.needs) or 'nothing unmerged'}")
    assert "dry run: nothing trained or written" in captured.out and "students (" in captured.out
    assert not (tmp_path / "runs").exists()
    for size in entry.sizes:  # the paper's sizes are printed beside ours
        assert f"paper's size of {size.model}: {size.params:g}M params" in captured.out


def _sizes(name):
    entry = find(name)
    config = load_config(entry.config_path)
    try:
        teachers, students = plan(entry, config, entry.num_classes, entry.input_shape)
    except Exception as err:  # noqa: BLE001 -- the message says what is missing
        pytest.fail(f"{name} cannot be built ({err}); it needs {', '.join(entry.needs)}")
    return {s.role[len("student "):]: s for s in students}


@pytest.mark.parametrize("name", ["ensemblenet-t1a-resnet152", "ensemblenet-t1b-seresnet152"])
def test_ensemblenet_imagenet_parameters_with_batch_norm_folded_equal_the_papers(name):
    # Table 1a: 60.1M baseline, 58.2M multi-headed; Table 1b: 66.7M and 64.5M (batch norm folded)
    students = _sizes(name)
    for size in find(name).sizes:
        ours = students[size.model].folded / 1e6
        assert round(ours, 1) == size.params, (name, size.model, ours)


def test_training_compute_by_hand():
    from ensemble_kd.reproduce.show import training_macs
    from ensemble_kd.reproduce.sizes import measure

    entry = find("aekd-t1-cifar10-resnet20")
    teacher = measure("t", "resnet56", {"shortcut": "B"}, 10, (3, 32, 32)).macs
    student = measure("s", "resnet20", {"shortcut": "B"}, 10, (3, 32, 32)).macs
    n = 50000
    # 25 teachers x 240 epochs; the student alone x 350; 4 runs per M (AVER, AE-KD, FitNets, AE-KD*) x 350,
    # each reading M teachers forward once per image
    expected = 25 * 3 * teacher * n * 240 + 3 * student * n * 350 + sum(
        4 * (3 * student + M * teacher) * n * 350 for M in (1, 5, 10, 15, 20, 25))
    assert training_macs(entry, load_config(entry.config_path)) == expected
    # MEAL reads one teacher per iteration: a 2-teacher entry loaded from weights trains none
    meal = find("meal-t4-imagenet-plus")
    r50, r101, r152 = (measure("m", f"torchvision/resnet{d}", {}, 1000, (3, 224, 224)).macs for d in (50, 101, 152))
    assert training_macs(meal, load_config(meal.config_path)) == (3 * r50 + (r101 + r152) // 2) * 1281167 * 100
    # EnsembleNet trains no teachers: the baseline and four multi-headed runs, 180 epochs each
    enet = find("ensemblenet-t1a-resnet152")
    students = _sizes("ensemblenet-t1a-resnet152")
    heads = students["co-distillation μ=3"].macs
    assert training_macs(enet, load_config(enet.config_path)) == 3 * (students["baseline"].macs + 4 * heads) \
        * 1281167 * 180


def _run(tmp_path, name, *overrides, only):
    code = main(["reproduce", name, f"run.dir={tmp_path}", "run.name=r", *overrides, "--only", only])
    assert code == 0
    table = (tmp_path / "r" / "reproduce.md").read_text()
    cells = json.loads((tmp_path / "r" / "reproduce.json").read_text())
    return table, cells


DIGITS = ["data.name=digits", "data.root=null", "data.batch_size=64", "data.eval_batch_size=500",
          "teachers.arch=small_cnn", "teachers.kwargs={width: 0.25}", "teachers.train.epochs=1",
          "student.arch=small_cnn", "student.kwargs={width: 0.25}", "student.train.epochs=1", "device=cpu"]


@pytest.mark.slow
def test_aekd_smoke_run_ends_in_the_papers_layout_and_resumes(tmp_path):
    overrides = [*DIGITS, "teachers.count=2"]
    table, cells = _run(tmp_path, "aekd-t1-cifar10-resnet20", *overrides, only="student alone,M=1 AVER,M=1 AE-KD")
    assert "| | student | Ens | AVER | AE-KD |" in table  # the paper's columns, its rows
    assert "| 1 |  | 93.94 / " in table and "91.84 / " in table
    assert "* budget differs from the paper's: data.name ('cifar10' -> 'digits')" in table
    assert "student.train.epochs (350 -> 1)" in table and "teachers.count (25 -> 2)" in table
    by_cell = {(c["row"], c["column"]): c for c in cells["cells"]}
    ens = by_cell["1", "Ens"]
    assert 0 < ens["ours"] <= 100 and ens["diff"] == pytest.approx(ens["ours"] - 93.94)
    # run again: every run is reused, nothing trained; another teachers budget is refused
    before = (tmp_path / "r" / "sweep" / "M=1_AVER" / "seed0" / "model.pt").stat().st_mtime_ns
    assert _run(tmp_path, "aekd-t1-cifar10-resnet20", *overrides, only="M=1 AVER")[1]["cells"][0]["ours"] is not None
    assert (tmp_path / "r" / "sweep" / "M=1_AVER" / "seed0" / "model.pt").stat().st_mtime_ns == before
    assert main(["reproduce", "aekd-t1-cifar10-resnet20", f"run.dir={tmp_path}", "run.name=r", *overrides,
                 "teachers.train.epochs=2", "--only", "M=1 AVER"]) == 2
    # a row that takes more teachers than the config makes: refused before anything is written
    assert main(["reproduce", "aekd-t1-cifar10-resnet20", f"run.dir={tmp_path}", "run.name=t", *overrides,
                 "--only", "M=5 AVER"]) == 2
    assert not (tmp_path / "t").exists()


@pytest.mark.slow
def test_nam_smoke_run(tmp_path):
    table, cells = _run(tmp_path, "nam-t1-cifar10", *DIGITS, "teachers.count=2", "sweep.seeds=[0]",
                        "data.val_fraction=0.2", only="KD,LatentBE")
    assert "| | ACC | NLL | ECE | cNLL | cECE |" in table
    assert "| KD + LatentBE | 93.98 / " in table  # the collapsed network's row
    assert {c["row"] for c in cells["cells"]} == {"KD", "KD + LatentBE"}  # DE-4 needs 4 teachers: not run


@pytest.mark.slow
def test_meal_smoke_run(tmp_path):
    table, cells = _run(tmp_path, "meal-t1-cifar10", *DIGITS, "teachers.members.0.arch=small_cnn",
                        "teachers.members.0.kwargs={width: 0.25}", only="base model,max-pool alignment")
    assert "| base model | 6.34 / " in table and "| max-pool alignment | 6.32 / " in table
    assert all(c["ours"] is not None for c in cells["cells"])


@pytest.mark.slow
def test_ensemblenet_smoke_run(tmp_path):
    table, cells = _run(tmp_path, "ensemblenet-t2-youtube8m", "data.name=video-synthetic", "data.root=null",
                        "data.num_classes=null", "data.batch_size=256", "student.train.epochs=1",
                        "student.kwargs={cluster_size: 16, hidden_size: 16, num_experts: 2}", "device=cpu",
                        "method.options.branch_widths=[12]", "method.options.branch_kwargs={num_experts: 1}",
                        only="baseline DBoF,co-distillation μ=2")
    assert "| | GAP | mAP |" in table and "| Baseline | 87.93 / " in table and "| μ=2 | 88.36 / " in table
    assert "student.kwargs.cluster_size (4096 -> 16)" in table


def test_an_interrupted_reproduce_says_the_same_command_continues_it(tmp_path, monkeypatch, capsys):
    from ensemble_kd.reproduce import run

    def stop(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(run.pipeline, "train_teachers", stop)
    code = main(["reproduce", "aekd-t1-cifar10-resnet20", f"run.dir={tmp_path}", "run.name=r", *DIGITS,
                 "teachers.count=1", "--only", "M=1 AVER"])
    assert code == 130
    assert f"the same command continues it in {tmp_path / 'r'}" in capsys.readouterr().err.replace("\n", "")


@pytest.mark.slow
def test_cache_serves_the_variants_that_read_logits_alone(tmp_path):
    overrides = [*DIGITS, "teachers.count=1", "data.view_seed=0", "--cache"]
    table, _ = _run(tmp_path, "aekd-t1-cifar10-resnet20", *overrides, only="M=1 AVER,M=1 FitNets")
    assert "data.view_seed (None -> 0)" in table  # every seed on the same views: a budget change
    assert (tmp_path / "r" / "cache-M1" / "cache.json").is_file()
    aver = load_config(tmp_path / "r" / "sweep" / "M=1_AVER" / "seed0" / "config.yaml")
    fitnets = load_config(tmp_path / "r" / "sweep" / "M=1_FitNets" / "seed0" / "config.yaml")
    assert aver.teachers.cache == str(tmp_path / "r" / "cache-M1") and aver.cache.epochs == 1
    assert fitnets.teachers.cache is None  # hints need the teachers' taps: online
    model = tmp_path / "r" / "sweep" / "M=1_AVER" / "seed0" / "model.pt"
    before = model.stat().st_mtime_ns
    _run(tmp_path, "aekd-t1-cifar10-resnet20", *overrides, only="M=1 AVER,M=1 FitNets")  # reused, not retrained
    assert model.stat().st_mtime_ns == before
    assert main(["reproduce", "aekd-t1-cifar10-resnet20", f"run.dir={tmp_path}", "run.name=s", *DIGITS,
                 "teachers.count=1", "--cache", "--only", "M=1 AVER"]) == 2  # no view_seed: refused
    assert not (tmp_path / "s").exists()
