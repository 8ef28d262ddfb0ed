"""`ensemble-kd export`: each format's file, loaded back, gives PyTorch's outputs within the stated
tolerance for a CIFAR ResNet, a collapsed LatentBE student and a multi-headed (EnsembleNet) student;
bad runs are refused in one sentence with nothing written.

The runs are built as distill writes them (config.yaml, model.pt through save_model, collapsed.pt
from the method's deployable), with every weight and BatchNorm statistic moved off its initial value
so the collapse and the eval-mode BatchNorm have something to get wrong."""

import importlib.util
import warnings

import pytest
import torch

from _runs import files, one_sentence
from ensemble_kd import export, pipeline
from ensemble_kd.cli import main
from ensemble_kd.config import load_config
from ensemble_kd.engine.checkpoint import save_model
from ensemble_kd.engine.runs import write_config
from ensemble_kd.models import create

SMALL = {"widths": [4, 8, 16]}  # resnet20 at a quarter of its width
HAS_ONNX = all(importlib.util.find_spec(m) is not None for m in export.ONNX_MODULES)
FORMATS = [pytest.param("onnx", marks=pytest.mark.skipif(not HAS_ONNX, reason="the export extra is not installed")),
           "torchscript", "exported-program"]
DIGITS = {"name": "digits", "classes": None, "num_classes": 10, "channels": 1, "image_size": [8, 8],
          "mean": None, "std": None}
CIFAR = {**DIGITS, "name": "cifar10", "channels": 3, "image_size": [32, 32]}


def _unsettle(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights, factors and BatchNorm statistics away from their initial values, as training leaves them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # scaled by up to ±20% (BE factors and BN weights leave 1), biases off 0
            p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g)).add_(0.02 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
    return model.eval()


def _distill_run(root, name, overrides, record, in_channels):
    """A finished distill run as pipeline.distill leaves it: model.pt and, when the method ships another
    network, collapsed.pt (its deployable)."""
    config = load_config(None, ["student.arch=resnet20", "student.kwargs={widths: [4, 8, 16]}", *overrides])
    method = pipeline.method_from(config)
    arch, kwargs = method.student_spec(config.student.arch, config.student.kwargs, 3)
    model = _unsettle(create(arch, num_classes=10, in_channels=in_channels, **kwargs), seed=len(name))
    run = root / name
    write_config(run, config, "distill")
    save_model(model, run / "model.pt", {"data": record})
    shipped = method.deployable(model)
    if shipped is not None:
        save_model(shipped, run / pipeline.SHIPPED_FILE, {"data": record})
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    return {
        # CIFAR-10 is not on this machine: the check runs on random inputs of the recorded 3x32x32
        "resnet": _distill_run(root, "resnet", ["data.name=cifar10", "data.root=/nonexistent/cifar", "method.name=ce"],
                               CIFAR, 3),
        "latentbe": _distill_run(root, "latentbe", ["method.name=latentbe", "method.options={members: 3}"], DIGITS, 1),
        "ensemblenet": _distill_run(root, "ensemblenet", ["method.name=ensemblenet",
                                                          "method.options={branches: 3, fork: layer2}"], DIGITS, 1),
    }


def _load_back(path, fmt):
    """The written file as a function of a batch, loaded as a user would (ONNX through ONNX Runtime)."""
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda x: torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit")  # deprecated: README
        module = torch.jit.load(str(path)) if fmt == "torchscript" else torch.export.load(str(path)).module()
    return lambda x: module(x).detach()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", ["resnet", "latentbe", "ensemblenet"])
def test_the_written_file_gives_pytorchs_outputs(runs, kind, fmt, tmp_path):
    out = tmp_path / f"student{export.FORMATS[fmt]}"
    done = export.export_run(runs[kind], fmt, out)
    shipped = done.student.model
    assert done.check.passed and done.check.max_abs_diff <= done.check.tolerance
    print(f"parity {kind} {fmt}: max abs diff {done.check.max_abs_diff:.3g}, tolerance {done.check.tolerance:.3g}")
    if kind == "latentbe":  # the collapsed plain network is what ships, not the BatchEnsemble
        assert done.student.file.name == pipeline.SHIPPED_FILE and shipped.spec["name"] == "resnet20"
    elif kind == "ensemblenet":  # one pass through every head, their mixture out
        assert shipped.spec["name"] == "multihead" and shipped.spec["branches"] == 3
    if kind == "resnet":
        assert done.check.inputs.startswith("64 random inputs of the recorded shape (3, 32, 32)")
    else:
        assert done.check.inputs == "64 test inputs of digits"
    # our own check of the file on batches of other sizes than the export's example (2) and the check's (16)
    run = _load_back(out, fmt)
    shape = (3, 32, 32) if kind == "resnet" else (1, 8, 8)
    for batch in (1, 5):
        x = torch.randn((batch, *shape), generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            want = shipped(x)
        assert (run(x) - want).abs().max().item() <= export.TOLERANCE * max(1.0, want.abs().max().item())
        assert want.std() > 0.1  # logits that vary: an export of a constant could not pass by luck


def test_the_check_fails_on_a_file_that_differs_and_then_nothing_is_written(runs, tmp_path, monkeypatch):
    student = export.deployable_student(runs["resnet"])
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        assert export.compare(student.model, student.model, x, "x").max_abs_diff == 0
        off = export.compare(student.model, lambda x: student.model(x) + 1.0, x, "x")
    assert off.max_abs_diff == pytest.approx(1.0, rel=1e-4) and not off.passed
    real = export.runner
    monkeypatch.setattr(export, "runner", lambda data, fmt: (lambda x, run=real(data, fmt): run(x) * 1.01))
    out = tmp_path / "student.pt2"
    with pytest.raises(export.ExportError, match=r"differs from PyTorch by .* over the tolerance .* nothing written"):
        export.export_run(runs["resnet"], "exported-program", out)
    assert not out.exists() and not any(tmp_path.iterdir())


def test_the_command_prints_the_check_and_both_latencies(runs, tmp_path, capsys):
    out = tmp_path / "deploy" / "net.torchscript.pt"
    assert main(["export", str(runs["latentbe"]), "--format", "torchscript", "--out", str(out), "--latency"]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert f"exported {runs['latentbe'] / 'collapsed.pt'} (latentbe: resnet20) to {out}" in printed
    assert "check on 64 test inputs of digits: max |torchscript - PyTorch| = " in printed and ": pass" in printed
    assert "batch-1 latency: PyTorch " in printed and " ms (IQR " in printed and ", torchscript " in printed
    assert isinstance(_load_back(out, "torchscript")(torch.zeros(1, 1, 8, 8)), torch.Tensor)


def test_the_default_file_is_beside_the_run(runs):
    before = files(runs["ensemblenet"])
    assert main(["export", str(runs["ensemblenet"]), "--format", "exported-program"]) == 0
    written = set(files(runs["ensemblenet"])) - set(before)
    assert {str(p) for p in written} == {"student.pt2"}


def _damage(run, name, data):
    (run / name).write_bytes(data)


@pytest.mark.parametrize("case, said", [
    ("teacher run", "is not a distill run (it holds a train-teachers run); pass the directory of a distill run"),
    ("no config", "is not a distill run (it has no config.yaml naming the command that made it)"),
    ("damaged model.pt", "model.pt' is damaged: a torch file of 200 bytes that is truncated or corrupt; restore it, "
                         "or train the run again (distill --overwrite)"),
    ("damaged model.json", "model.json' is damaged (not valid JSON"),
    ("unfinished", "has no model.pt: its training has not finished; finish it with `ensemble-kd distill --resume"),
    ("no collapsed.pt", "has no collapsed.pt, the network method 'latentbe' ships"),
    ("out is a directory", "is a directory; name the file to write"),
    ("tolerance 0", "--tolerance must be a positive number, got 0.0"),
    ("onnx not installed", "--format onnx needs no_such_module_here, which are not installed: "
                           "pip install 'ensemble-kd[export]'"),
])
def test_a_bad_run_is_refused_in_one_sentence_and_nothing_is_written(runs, case, said, tmp_path, capsys,
                                                                     monkeypatch):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(runs["latentbe"], run)
    out, fmt = tmp_path / "out.pt2", "exported-program"
    if case == "teacher run":
        text = (run / "config.yaml").read_text()
        (run / "config.yaml").write_text(text.replace("# ensemble-kd distill", "# ensemble-kd train-teachers", 1))
    elif case == "no config":
        (run / "config.yaml").unlink()
    elif case == "damaged model.pt":
        _damage(run, "model.pt", (run / "model.pt").read_bytes()[:200])
    elif case == "damaged model.json":
        _damage(run, "model.json", b'{"spec": {"name": "batchens')
    elif case == "unfinished":
        (run / "model.pt").unlink()
    elif case == "no collapsed.pt":
        (run / "collapsed.pt").unlink()
    elif case == "out is a directory":
        out = tmp_path / "a-dir"
        out.mkdir()
    elif case == "onnx not installed":
        monkeypatch.setattr(export, "ONNX_MODULES", ("no_such_module_here",))
        fmt = "onnx"
    before = files(tmp_path)
    capsys.readouterr()
    tolerance = ["--tolerance", "0"] if case == "tolerance 0" else []
    assert main(["export", str(run), "--format", fmt, "--out", str(out), *tolerance]) == 2
    message = one_sentence(capsys)
    assert message.startswith("error: ") and said in message and message.count(". ") == 0, message
    assert files(tmp_path) == before


def test_latency_times_each_call_after_the_warmup_and_waits_for_it():
    from ensemble_kd.metrics.cost import time_calls

    calls, synced = [], []
    times = time_calls(calls.append, "x", repeats=3, warmup=2, sync=lambda: synced.append(len(calls)))
    assert len(times) == 3 and calls == ["x"] * 5 and synced == [2, 3, 4, 5]  # after the warmup, then each call
    with pytest.raises(ValueError, match="repeats=0 must be >= 1"):
        time_calls(calls.append, "x", repeats=0)


def test_an_exporter_failure_is_one_sentence_with_its_reason_and_nothing_is_written(runs, tmp_path, capsys,
                                                                                     monkeypatch):
    import sys

    def fails(*args, **kwargs):  # as torch.export does on a data-dependent shape: a graph on stderr, then an error
        print("def forward(self, x):\n    pages of graph", file=sys.stderr)
        try:
            raise RuntimeError("\x1b[1mCould not guard on data-dependent expression\x1b[0m\nmore lines")
        except RuntimeError as cause:
            raise RuntimeError("Failed to export the model with torch.export.\nNext steps:") from cause
    monkeypatch.setattr(torch.export, "export", fails)
    out = tmp_path / "student.pt2"
    assert main(["export", str(runs["resnet"]), "--format", "exported-program", "--out", str(out)]) == 2
    assert one_sentence(capsys) == (f"error: exported-program export of '{runs['resnet'] / 'model.pt'}' failed: Could "
                                    f"not guard on data-dependent expression; try another --format")
    assert not any(tmp_path.iterdir())
