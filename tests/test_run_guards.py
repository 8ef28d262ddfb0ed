"""What a run is, checked before anything is written (issue 19): the command that made a run
directory, the demo's students, safe run and variant names, the data a model is scored on,
overrides that change one key only, the listing a streamed run trained on, method options that
need the models, and a killed run's DataLoader workers.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ensemble_kd.cli import main
from ensemble_kd.config import ConfigError, load_config
from ensemble_kd.engine.runs import write_config

sys.path.insert(0, str(Path(__file__).parent))
from _images import make_image_folder  # noqa: E402
from _runs import files as _files, one_sentence as _error  # noqa: E402

TINY = ["student.train.epochs=1", "teachers.train.epochs=1", "student.kwargs={width: 0.25}",
        "teachers.kwargs={width: 0.25}", "eval.latency=false", "data.batch_size=256", "device=cpu"]
SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    assert main(["train-teachers", f"run.dir={root}", "run.name=t", "teachers.count=2", *TINY]) == 0
    return root / "t"


# ---------------------------------------------------------------------- 1: a run is resumed by its command

KINDS = {"demo": "demo --methods ce", "train-teachers": "train-teachers", "distill": "distill",
         "cache-teachers": "cache-teachers", "sweep": "sweep"}


def _made_by(root: Path, header: str) -> Path:
    """A run directory as `header` writes it (its config.yaml), with the marker files of its kind."""
    run = root / header.split()[0]
    write_config(run, load_config(None, TINY), header)
    return run


@pytest.mark.parametrize("command", list(KINDS))
def test_a_run_is_resumed_only_by_the_command_that_made_it(command, tmp_path, capsys):
    for kind, header in KINDS.items():
        if kind == command:
            continue
        run = _made_by(tmp_path, header)
        before = _files(run)
        assert main([command, "--resume", str(run)]) == 2, kind
        message = _error(capsys)
        assert f"cannot resume '{run}' with {command}: it holds a {kind} run" in message
        assert f"ensemble-kd {kind} --resume {run}" in message
        assert _files(run) == before


def test_distill_never_trains_inside_a_teacher_run(teachers, capsys):
    before = _files(teachers)
    assert main(["distill", "--resume", str(teachers)]) == 2
    assert "it holds a train-teachers run" in _error(capsys)
    assert _files(teachers) == before


@pytest.mark.parametrize("kind", ["distill", "train-teachers", "sweep"])
def test_a_cache_is_never_built_inside_another_commands_run(kind, tmp_path, capsys):
    run = _made_by(tmp_path, kind)
    before = _files(run)
    assert main(["cache-teachers", f"cache.dir={run}", *TINY]) == 2
    assert f"cache.dir '{run}' holds a {kind} run; choose another cache.dir" in _error(capsys)
    assert _files(run) == before


def test_a_sweep_never_adopts_a_student_run(tmp_path, capsys):
    run = _made_by(tmp_path, "distill")
    before = _files(run)
    assert main(["sweep", f"run.dir={tmp_path}", "run.name=distill", *TINY]) == 2
    assert "holds an unfinished run" in _error(capsys)
    assert _files(run) == before


# ---------------------------------------------------------------------- 2: the demo's --methods is part of the run

@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    assert main(["demo", f"run.dir={root}", "run.name=d", "--methods", "ce,aver", "teachers.count=2", *TINY]) == 0
    return root / "d"


def test_a_resumed_demo_trains_the_students_it_was_started_with(demo, tmp_path):
    import shutil
    run = tmp_path / "d"
    shutil.copytree(demo, run)
    for gone in ["results.json", "results.md"]:  # as if killed while the aver student trained
        (run / gone).unlink()
    shutil.rmtree(run / "student-aver")
    assert main(["demo", "--resume", str(run)]) == 0
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("student")) == ["student", "student-aver"]
    names = [r["name"] for r in json.loads((run / "results.json").read_text())]
    assert [n.split(" (")[0] for n in names if n.startswith("student")] == ["student alone", "student aver"]


def test_a_resumed_demo_refuses_other_methods_naming_both(demo, capsys):
    before = _files(demo)
    assert main(["demo", "--resume", str(demo), "--methods", "ce,kd"]) == 2
    message = _error(capsys)
    assert f"cannot resume '{demo}' with --methods ce,kd: it was started with --methods ce,aver" in message
    assert _files(demo) == before
    assert main(["demo", "--resume", str(demo), "--methods", "ce,aver"]) == 0  # the same list: resumed


# ---------------------------------------------------------------------- 14, 16: one short sentence

@pytest.mark.parametrize("override, words", [
    ("student.train.optim.lr=[", "override 'student.train.optim.lr=[' has a value that is not valid YAML"),
    ("student.kwargs=!!python/object/apply:os.system [echo]", "could not determine a constructor"),
    ("student.kwargs={a: [1,}", "not valid YAML"),
])
def test_a_malformed_override_value_is_one_sentence(override, words, tmp_path, capsys):
    assert main(["distill", override, f"run.dir={tmp_path}", "run.name=r"]) == 2
    message = _error(capsys)
    assert words in message and len(message) < 300
    assert not (tmp_path / "r").exists()


def test_a_yaml_alias_bomb_is_a_short_message(tmp_path, capsys):
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i, name in enumerate("bcde"):
        prev = "abcdefg"[i]
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    lines.append("student: {arch: *e}")
    config = tmp_path / "bomb.yaml"
    config.write_text("\n".join(lines) + "\n")
    assert main(["distill", str(config), f"run.dir={tmp_path}"]) == 2
    message = _error(capsys)
    assert "config key 'student.arch'" in message and len(message) < 300


def test_a_callable_that_is_not_a_model_builder_is_named_so(tmp_path, capsys):
    assert main(["distill", "student.arch=os:system", f"run.dir={tmp_path}", "run.name=r"]) == 2
    message = _error(capsys)
    assert "'os:system' is not a model builder" in message and "kwargs" not in message
    assert not (tmp_path / "r").exists()


def test_the_temperature_note_says_what_each_bound_means():
    from ensemble_kd.metrics.temperature import T_MAX, T_MIN
    from ensemble_kd.report import TEMPERATURE_NOTE
    low, high = TEMPERATURE_NOTE.split(f"T={T_MAX:g}", 1)[0], TEMPERATURE_NOTE.split(f"T={T_MAX:g}", 1)[1]
    assert f"T={T_MIN:g}" in low and "classified right" in low  # the lower bound: separable validation split
    assert "classified" not in high and "uniform" in high  # the upper one: no better than chance


def test_evaluating_a_checkpoint_never_replaces_another_runs_results(teachers, tmp_path, capsys):
    import shutil
    run = tmp_path / "t"
    shutil.copytree(teachers, run)
    before = _files(run)
    member = sorted(run.glob("members/*/model.pt"))[0]
    assert main(["evaluate", str(member), "--out", str(run), "eval.latency=false"]) == 2
    assert f"'{run}' holds a train-teachers run" in _error(capsys)
    assert _files(run) == before
    assert main(["evaluate", str(member), "--out", str(tmp_path / "ev"), "eval.latency=false"]) == 0
    assert main(["compare", str(tmp_path / "ev"), "--out", str(run)]) == 2  # compare writes no run's results
    assert f"'{run}' holds a train-teachers run" in _error(capsys) and _files(run) == before


def test_two_caches_in_one_directory_advise_cache_dir(teachers, tmp_path, capsys):
    from ensemble_kd.engine.run_dir import RunLock
    cache = tmp_path / "cache"
    cache.mkdir()
    with RunLock(cache):  # another cache-teachers building there (flock: a second open conflicts)
        assert main(["cache-teachers", f"teachers.source={teachers}", f"cache.dir={cache}", *TINY]) == 2
    message = _error(capsys)
    assert "is in use by another ensemble-kd process" in message and message.endswith("choose another cache.dir")


# ---------------------------------------------------------------------- 4: every model scored on data is checked

def _fashion_record(record: dict) -> dict:
    return {**record, "name": "fashion-mnist", "image_size": [28, 28],
            "classes": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                        "Bag", "Ankle boot"]}


@pytest.mark.parametrize("target", ["model.pt", "last.pt", "run"])
def test_a_model_of_other_data_is_refused_by_every_evaluate(target, teachers, tmp_path, capsys):
    """A Fashion-MNIST checkpoint (its recorded data) is not scored on digits, whichever file names it."""
    import shutil

    import torch
    member = tmp_path / "m"
    shutil.copytree(sorted(teachers.glob("members/*"))[0], member)
    sidecar = json.loads((member / "model.json").read_text())
    (member / "model.json").write_text(json.dumps({**sidecar, "data": _fashion_record(sidecar["data"])}))
    state = torch.load(member / "last.pt", weights_only=True)
    torch.save({**state, "data": _fashion_record(state["data"])}, member / "last.pt")
    config = tmp_path / "digits.yaml"
    config.write_text("data: {name: digits}\n")
    if target == "run":  # a run directory of its own, as a student run is
        write_config(member, load_config(config), "distill")
    path = member if target == "run" else member / target
    assert main(["evaluate", str(path), "--config", str(config), "eval.latency=false"]) == 2
    message = _error(capsys)
    assert "was trained on fashion-mnist (28x28" in message and "this run's data is digits (8x8" in message
    assert not (tmp_path / "m" / f"{Path(target).stem}-eval").exists()
    assert main(["evaluate", str(path), "--config", str(config), "eval.latency=false",
                 "teachers.allow_other_data=true"]) == 0  # said to be intended


# ---------------------------------------------------------------------- 3: run and variant names are one safe folder

PIECES = ["..", ".", "/", "\\", "a", "B", " ", "_", "-", "~", "results.json", "RESULTS.md", "config.yaml",
          "Teachers", ".lock", "fingerprint.json", "seed0", "é", "lr=0.1", "\x00", "", "x" * 3]


def _names(rng: random.Random, count: int) -> list[str]:
    return ["".join(rng.choice(PIECES) for _ in range(rng.randint(1, 3))) for _ in range(count)]


def _one_sentence(err: Exception) -> str:
    text = str(err)
    assert "\n" not in text and len(text) < 400, text
    return text


def test_every_run_name_lands_inside_run_dir_or_is_refused(tmp_path):
    from ensemble_kd.config import validate_config
    from ensemble_kd.engine.run_dir import _fresh_dir
    root = (tmp_path / "runs").resolve()
    rng, landed, refused = random.Random(19), 0, 0
    for name in _names(rng, 400) + ["..", ".", "../../x", "/abs", "a/b", "a\\b", ""]:
        try:
            config = validate_config({"run": {"dir": str(root), "name": name}})
        except ConfigError as err:
            assert "run.name" in _one_sentence(err)
            refused += 1
            continue
        path = _fresh_dir(config, "distill")
        assert path.resolve().parent == root and path.is_dir(), name
        landed += 1
    assert landed > 50 and refused > 50  # both kinds were drawn


def test_run_name_dot_dot_is_refused_before_anything_is_written(tmp_path, capsys):
    inner = tmp_path / "inner"
    assert main(["distill", f"run.dir={inner}", "run.name=../../x", *TINY]) == 2
    assert "config key 'run.name'" in _error(capsys)
    assert not inner.exists() and not (tmp_path.parent / "x").exists()


def test_every_sweep_variant_lands_in_its_own_folder_or_is_refused(tmp_path):
    from ensemble_kd import sweep
    from ensemble_kd.config import validate_config
    run = (tmp_path / "sweep").resolve()
    written = {n.lower() for n in sweep.SWEEP_FILES}
    rng, landed, refused = random.Random(7), 0, 0
    for _ in range(300):
        names = _names(rng, rng.randint(1, 3))
        config = validate_config({"sweep": {"variants": {n: {} for n in names}}})
        try:
            plan = sweep.plan_runs(config, run)
        except ConfigError as err:
            assert "sweep variant" in _one_sentence(err)
            refused += 1
            continue
        folders = [p.out.parent for p in plan]
        for p in plan:
            assert p.out.resolve().parent.parent == run and p.out.name == "seed0", p.variant
            assert p.out.parent.name.lower() not in written, p.variant
        assert len({f.name.lower() for f in folders}) == len(set(names))  # one folder per variant, case aside
        landed += 1
    assert landed > 30 and refused > 30


@pytest.mark.parametrize("name", ["..", ".", "results.json", "Results.MD", "config.yaml", "teachers"])
def test_a_variant_named_like_a_folder_or_file_of_the_sweep_is_refused(name, tmp_path, capsys):
    config = tmp_path / "sweep.yaml"
    config.write_text(json.dumps({"sweep": {"variants": {name: {"method.name": "ce"}}}}))
    neighbour = tmp_path / "seed0"  # what a variant '..' trained into
    neighbour.mkdir()
    (neighbour / "keep").write_text("mine")
    assert main(["sweep", str(config), f"run.dir={tmp_path}", "run.name=x", "--overwrite", *TINY]) == 2
    assert f"sweep variant '{name}'" in _error(capsys)
    assert not (tmp_path / "x").exists() and (neighbour / "keep").read_text() == "mine"


# ---------------------------------------------------------------------- 5: an override changes its key alone

@pytest.fixture(scope="module")
def digits():
    from ensemble_kd import pipeline
    return pipeline.prepare_data(load_config(None, ["device=cpu"]))


@pytest.mark.parametrize("override, expected", [([], (1, False)), (["data.augment.flip=true"], (1, True)),
                                                (["data.augment.crop_padding=3"], (3, False)),
                                                (["data.augment={crop_padding: 0, flip: true}"], (0, True))])
def test_an_augment_override_keeps_the_datasets_other_keys(override, expected, digits, tmp_path):
    """digits' default is crop_padding 1 without flips: one key given leaves the other at it."""
    from ensemble_kd.config import dump_config
    config = load_config(None, ["device=cpu", *override])
    spec = digits.train_loader(config.data, seed=0).spec
    assert (spec.crop_padding, spec.flip) == expected
    (tmp_path / "config.yaml").write_text(dump_config(config))  # as a run writes and --resume reads it back
    again = digits.train_loader(load_config(tmp_path / "config.yaml").data, seed=0).spec
    assert (again.crop_padding, again.flip) == expected


def test_a_sweep_variant_changing_one_augment_key_keeps_the_others(digits):
    from ensemble_kd import sweep
    config = load_config(None, ["device=cpu", "sweep.variants={noflip: {data.augment.flip: true}}"])
    ((_, _, variant),) = sweep.variant_configs(config)
    spec = digits.train_loader(variant.data, seed=0).spec
    assert (spec.crop_padding, spec.flip) == (1, True)


def test_a_student_kwarg_override_keeps_the_default_students_width():
    assert load_config(None, ["student.kwargs.dropout=0.1"]).student.kwargs == {"width": 0.5, "dropout": 0.1}
    assert load_config(None, ["student.kwargs={width: 0.25}"]).student.kwargs == {"width": 0.25}
    assert load_config(None, ["student.arch=mlp", "student.kwargs.dropout=0.1"]).student.kwargs == {"dropout": 0.1}


def test_a_pretrained_members_input_override_keeps_the_librarys_other_keys(digits):
    """`input: {size: 16}` on a pretrained member keeps the library's mean and std (library is implied)."""
    from torch import nn

    from ensemble_kd import pipeline
    from ensemble_kd.config import TeacherMemberConfig
    model = nn.Identity()
    model.input_config = {"mean": [0.5], "std": [0.25], "size": [32, 32]}
    member = TeacherMemberConfig(arch="small_cnn", pretrained=True, input={"size": 16})
    adapter = pipeline.teacher_input(0, member, model, digits)
    plain = pipeline.teacher_input(0, TeacherMemberConfig(arch="small_cnn", pretrained=True), model, digits)
    assert list(adapter.size) == [16, 16] and list(plain.size) == [32, 32]
    assert adapter.scale.tolist() == plain.scale.tolist() and adapter.shift.tolist() == plain.shift.tolist()
    own = TeacherMemberConfig(arch="small_cnn", pretrained=True, input={"library": False, "size": 16})
    assert pipeline.teacher_input(0, own, model, digits).scale.tolist() != plain.scale.tolist()  # said so


def test_teachers_from_our_weights_files_are_checked_against_their_data(teachers, tmp_path, capsys):
    """teachers.members naming a model file of ours: its sidecar's record is read as a run's manifest is."""
    import shutil
    member = tmp_path / "m"
    shutil.copytree(sorted(teachers.glob("members/*"))[0], member)
    sidecar = json.loads((member / "model.json").read_text())
    (member / "model.json").write_text(json.dumps({**sidecar, "data": _fashion_record(sidecar["data"])}))
    members = f"teachers.members=[{{arch: small_cnn, kwargs: {{width: 0.25}}, weights: {member / 'model.safetensors'}}}]"
    assert main(["distill", "method.name=aver", members, f"run.dir={tmp_path}", "run.name=r", *TINY]) == 2
    assert "teacher 00-small_cnn-s0 was trained on fashion-mnist (28x28" in _error(capsys)
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------------- 10: options that need the models

OPTION_ERRORS = [  # with two teachers of small_cnn and a small_cnn student
    (["method.name=meal", "method.options.taps=[nope]"], "no module at path 'nope' in SmallCNN"),
    (["method.name=meal", "method.options.taps=[logits]", "method.options.tap_weights=[1, 2]"],
     "tap_weights has 2 entries for 1 taps"),
    (["method.name=meal", "method.options.taps=[logits, logits]", "method.options.teacher_taps=[logits]"],
     "as many student taps as teacher taps"),
    (["method.name=meal", "method.options.taps=[logits]", "method.options.teacher_taps=[nope]"],
     "teacher 0 has no module 'nope'"),
    (["method.name=aekd", "method.options={variant: features, student_tap: nope}"], "nope"),
    (["method.name=aekd", "method.options={variant: features, teacher_tap: nope}"], "teacher 0 has no module 'nope'"),
    (["method.name=meal", "method.options.taps=[logits]", "method.options.lengths=[10, 10]"],
     "lengths has 2 entries for 1 taps"),
    (["method.name=aekd", "method.options={variant: features, student_channels: 7, teacher_channels: [7, 7]}"],
     "the regressors were built for (student, teacher) channels [(7, 7), (7, 7)]"),
    (["method.name=aekd", "method.options.C=0.2"], "C=0.2 is below 1/M = 0.5 for 2 teachers"),
    (["method.name=kd", "method.options.teacher=5"], "teacher=5, but there are only 2 teachers"),
    (["method.name=latentbe", "method.options.members=5"], "5 members"),
    (["method.name=ensemblenet", "method.options.fork=nope"], "fork"),
    (["method.name=aver", "perturb.kind=tdiv_sdiv"], "config key 'perturb.kind': tdiv_sdiv needs a BatchEnsemble"),
]


@pytest.mark.parametrize("options, words", OPTION_ERRORS)
def test_distill_checks_every_option_against_the_models_before_writing(options, words, teachers, tmp_path, capsys):
    assert main(["distill", f"teachers.source={teachers}", *options, f"run.dir={tmp_path}", "run.name=r",
                 *TINY]) == 2
    assert words in _error(capsys)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("options, words", OPTION_ERRORS)
def test_the_demo_checks_every_option_against_the_models_before_training(options, words, tmp_path, capsys):
    method = options[0].split("=")[1]
    assert main(["demo", "--methods", method, "teachers.count=2", *options, f"run.dir={tmp_path}", "run.name=d",
                 *TINY]) == 2
    assert words in _error(capsys)
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("options, words", OPTION_ERRORS)
def test_a_sweep_checks_every_variants_options_against_the_models_before_writing(options, words, teachers,
                                                                               tmp_path, capsys):
    variant = dict(o.split("=", 1) for o in options)
    import yaml
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({"sweep": {"variants": {"fine": {"method.name": "aver"},
                                                             "bad": {k: yaml.safe_load(v) for k, v in variant.items()}}}}))
    assert main(["sweep", str(config), f"teachers.source={teachers}", f"run.dir={tmp_path}", "run.name=x",
                 *TINY]) == 2
    message = _error(capsys)
    assert "sweep variant 'bad'" in message and words in message
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------- 17: a killed run's workers go with it

def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:  # ppid
            found.append(int(stat.parent.name))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_killed_streamed_run_leaves_no_workers_and_no_lock(tmp_path):
    from ensemble_kd.engine.run_dir import RunLock
    folder = make_image_folder(tmp_path / "imgs", classes=("a", "b", "c", "d"), per_class=10, test_per_class=2,
                               sizes=(20, 40))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = tmp_path / "runs" / "s"
    argv = [sys.executable, "-m", "ensemble_kd.cli", "distill", "device=cpu", "data.name=image-folder",
            f"data.root={folder}", "data.views.size=16", "data.batch_size=4", "data.eval_batch_size=16",
            "data.workers=2", "student.kwargs={width: 0.25}", "student.train.epochs=3",
            "student.train.checkpoint_every=2", "eval.latency=false", f"run.dir={run.parent}", "run.name=s"]
    log = (tmp_path / "killed.err").open("w")
    first = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=log)
    try:
        for _ in range(1200):  # until it trains from a checkpoint with its workers running
            if first.poll() is not None or ((run / "last.pt").is_file() and len(_children(first.pid)) >= 2):
                break
            time.sleep(0.05)
        assert first.poll() is None, "the run ended before it could be killed"
        workers = _children(first.pid)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
        log.close()
    time.sleep(0.5)
    assert not [w for w in workers if Path(f"/proc/{w}").exists()
                and "Z" not in Path(f"/proc/{w}/stat").read_text().rsplit(")", 1)[1].split()[0]]
    with RunLock(run):  # free at once, not once the orphans notice
        pass
    resumed = subprocess.run([*argv[:3], "distill", "--resume", str(run)], env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for text in (resumed.stderr, (tmp_path / "killed.err").read_text()):
        assert "Traceback" not in text and "EOFError" not in text


# ---------------------------------------------------------------------- 6: a streamed run's listing is part of it

def _streamed(folder, run_dir, *extra):
    return ["device=cpu", "data.name=image-folder", f"data.root={folder}", "data.views.size=16", "data.batch_size=8",
            "data.eval_batch_size=16", "data.workers=0", "data.val_fraction=0", "student.kwargs={width: 0.25}",
            "student.train.epochs=1",
            "eval.latency=false", "eval.cost=false", f"run.dir={run_dir}", *extra]


@pytest.fixture
def streamed_folder(tmp_path):
    return make_image_folder(tmp_path / "imgs", classes=("a", "b", "c"), per_class=8, test_per_class=2,
                             sizes=(20, 32), modes=("RGB",))


@pytest.mark.parametrize("change, words", [("delete", "24 -> 22 samples: files were deleted"),
                                           ("add", "24 -> 25 samples: files were added"),
                                           ("relabel", "the same 24 samples, but other files, sizes or labels")])
def test_a_streamed_resume_refuses_a_changed_listing_unless_told(change, words, streamed_folder, tmp_path, capsys):
    import shutil
    assert main(["distill", *_streamed(streamed_folder, tmp_path, "run.name=s")]) == 0
    run = tmp_path / "s"
    files = sorted((streamed_folder / "train").rglob("*.*"))
    if change == "delete":
        files[0].unlink(), files[-1].unlink()
    elif change == "add":
        shutil.copy(files[0], files[0].with_name("extra.png"))
    else:  # one image moved to another class: the count stays
        shutil.move(files[0], streamed_folder / "train" / "c" / f"moved{files[0].suffix}")
    before = _files(run)
    capsys.readouterr()
    assert main(["distill", "--resume", str(run)]) == 2
    message = _error(capsys)
    assert f"cannot resume '{run}': its training listing changed since the run began ({words})" in message
    assert "--accept-changed-data" in message and _files(run) == before
    assert main(["distill", "--resume", str(run), "--accept-changed-data"]) == 0  # told: it goes on
    assert main(["distill", "--resume", str(run)]) == 0  # and the listing it now holds is the new one


def test_a_sweep_refuses_its_runs_on_a_changed_listing(streamed_folder, tmp_path, capsys):
    argv = ["sweep", *_streamed(streamed_folder, tmp_path, "run.name=x")]
    assert main(argv) == 0
    sorted((streamed_folder / "train").rglob("*.*"))[0].unlink()
    before = _files(tmp_path / "x")
    capsys.readouterr()
    assert main(argv) == 2
    message = _error(capsys)
    assert "was made with another training listing (24 -> 23 samples: files were deleted" in message
    assert _files(tmp_path / "x") == before
    assert main([*argv, "--accept-changed-data"]) == 0
