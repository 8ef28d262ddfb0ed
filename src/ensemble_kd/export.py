"""The deployable student of a distill run, written as ONNX, TorchScript or a torch.export program,
and checked against PyTorch before the file is written.

    ensemble-kd export RUN --format onnx|torchscript|exported-program [--out FILE] [--latency]

The network exported is the one a method ships: LatentBE's collapsed BatchEnsemble
(`collapsed.pt`, as distill wrote it, BatchNorm recalibrated when asked), EnsembleNet's
multi-headed network (its forward is the ensemble's one pass), any other method's `model.pt`.
The file is built in memory, loaded back from those bytes (ONNX through ONNX Runtime) and run on
held-out inputs: the run's test split when its data is at hand, else random inputs of the shape the
run recorded. It is written only when max |exported - PyTorch| <= tolerance x max(1, max |PyTorch|).
The batch axis is dynamic in every format (the example is a batch of 2; the check runs other sizes).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import pipeline
from .config import Config
from .engine import CheckpointError, load_model
from .engine.checkpoint import atomic_write, model_data
from .engine.run_dir import recorded_command, saved_config
from .metrics.cost import latency_of, time_calls

FORMATS = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "exported-program": ".pt2"}
ONNX_MODULES = ("onnx", "onnxruntime", "onnxscript")  # the extra `export`
TOLERANCE = 1e-4  # relative to max(1, max |logit|): float32 kernels that fuse or reorder sums differ by ~1e-6
CHECK_INPUTS = 64  # held-out inputs the check runs, in batches of CHECK_BATCH
CHECK_BATCH = 16


class ExportError(ValueError):
    """A run that cannot be exported, or an export that does not match PyTorch; the message says why."""


@dataclass
class Student:
    model: nn.Module
    file: Path  # the model file it was loaded from
    config: Config


@dataclass
class Check:
    max_abs_diff: float
    tolerance: float  # the absolute bound: relative tolerance x max(1, max |PyTorch output|)
    inputs: str  # what the inputs were, in words

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance


def check_format(fmt: str) -> None:
    """A known format whose libraries are installed, before anything is loaded."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    missing = [m for m in ONNX_MODULES if importlib.util.find_spec(m) is None] if fmt == "onnx" else []
    if missing:
        raise ExportError(f"--format onnx needs {', '.join(missing)}, which are not installed: "
                          f"pip install 'ensemble-kd[export]'")


def deployable_student(run_dir: Path) -> Student:
    """The network a distill run ships (method.deployable's choice), loaded on the CPU in eval mode."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"'{run_dir}' is not a directory; pass the directory of a distill run")
    made = recorded_command(run_dir)[:1]
    if made != ["distill"]:
        held = f"it holds a {made[0]} run" if made else "it has no config.yaml naming the command that made it"
        raise ExportError(f"'{run_dir}' is not a distill run ({held}); pass the directory of a distill run "
                          f"(a demo's student-<method>/ is one)")
    config = saved_config(run_dir)
    trained = run_dir / "model.pt"
    if not trained.is_file():
        raise ExportError(f"'{run_dir}' has no model.pt: its training has not finished; finish it with "
                          f"`ensemble-kd distill --resume {run_dir}`")
    model = _load(trained)
    method = pipeline.method_from(config)
    if method.deployable(model) is None:  # the trained network is the one to ship
        return Student(model.eval(), trained, config)
    shipped = run_dir / pipeline.SHIPPED_FILE
    if not shipped.is_file():
        raise ExportError(f"'{run_dir}' has no {pipeline.SHIPPED_FILE}, the network method '{config.method.name}' "
                          f"ships; train the run again (distill --overwrite) to write it")
    return Student(_load(shipped).eval(), shipped, config)


def _load(path: Path) -> nn.Module:
    try:
        return load_model(path)
    except CheckpointError as err:
        raise CheckpointError(f"{err}; restore it, or train the run again (distill --overwrite)") from None


def held_out_inputs(student: Student, count: int = CHECK_INPUTS) -> tuple[torch.Tensor, str]:
    """Up to `count` inputs of the run's test split, or (its data not at hand) seeded random
    inputs of the shape its model file records; and what they are, in words."""
    config = student.config
    small = config.model_copy(update={"data": config.data.model_copy(update={"eval_batch_size": count})})
    try:
        data = pipeline.prepare_data(small, device=torch.device("cpu"))  # one batch of `count` decoded, not 1024
    except (OSError, ValueError) as err:  # ConfigError too: the data's root moved, a file is gone
        shape = recorded_shape(student.file)
        if shape is None:
            raise ExportError(f"the data of '{student.file.parent}' is not at hand ({err}) and its "
                              f"{student.file.with_suffix('.json').name} records no input shape; make the data "
                              f"reachable at data.root") from None
        x = torch.randn((count, *shape), generator=torch.Generator().manual_seed(0))
        reason = " ".join(str(err).split())
        return x, f"{count} random inputs of the recorded shape {tuple(shape)} (the data is not at hand: {reason})"
    taken, seen = [], 0
    for batch in data.test.batches(0):
        taken.append(batch.x[: count - seen].cpu())
        seen += len(taken[-1])
        if seen >= count:
            break
    return torch.cat(taken), f"{seen} test inputs of {config.data.name}"


def recorded_shape(model_file: Path) -> tuple[int, ...] | None:
    """(channels, *image_size) from the data record beside a model file; None for unrecorded or video data."""
    record = model_data(model_file) or {}
    if record.get("image_size") is None or record.get("channels") is None:
        return None
    return (int(record["channels"]), *(int(s) for s in record["image_size"]))


def export_bytes(model: nn.Module, example: torch.Tensor, fmt: str) -> bytes:
    """The file's bytes, batch axis dynamic. ONNX: torch.export's exporter (dynamo=True, the default
    since torch 2.9; the TorchScript-based one is deprecated), which needs onnxscript."""
    batch = {0: torch.export.Dim("batch", min=1)}
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # torch.jit's deprecation (README) and the tracer's constants (a head count, log N): the check catches
        # a trace that does not generalise, as it runs batches of another size than the example's
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        if fmt == "onnx":
            program = torch.onnx.export(model, (example,), dynamo=True, verbose=False, input_names=["input"],
                                        output_names=["logits"], dynamic_shapes=(batch,))
            return program.model_proto.SerializeToString()
        if fmt == "torchscript":
            torch.jit.save(torch.jit.trace(model, (example,)), buffer)
        else:
            torch.export.save(torch.export.export(model, (example,), dynamic_shapes=(batch,)), buffer)
    return buffer.getvalue()


def runner(data: bytes, fmt: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The exported network, loaded back from its bytes, as a function of a CPU batch."""
    if fmt == "onnx":
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # as many threads as PyTorch: a fair latency
        session = onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        return lambda x: torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit")
        module = torch.jit.load(io.BytesIO(data)) if fmt == "torchscript" else \
            torch.export.load(io.BytesIO(data)).module()

    def run(x):
        with torch.no_grad():
            return module(x)
    return run


def compare(model: nn.Module, run: Callable, inputs: torch.Tensor, described: str,
            tolerance: float = TOLERANCE) -> Check:
    """max |run(x) - model(x)| over `inputs` in batches of CHECK_BATCH, against tolerance x max(1, max |model(x)|)."""
    worst, scale = 0.0, 1.0
    with torch.no_grad():
        for x in inputs.split(CHECK_BATCH):
            want = model(x).float()
            worst = max(worst, (run(x).float() - want).abs().max().item())
            scale = max(scale, want.abs().max().item())
    return Check(worst, tolerance * scale, described)


def batch1_latency(call: Callable, shape: tuple[int, ...]) -> tuple[float, float]:
    """Median and interquartile range, in ms, of `call` on one random input (eval.latency's repeats)."""
    x = torch.randn((1, *shape))
    with torch.no_grad():
        return tuple(latency_of(time_calls(call, x)))


@contextlib.contextmanager
def _quiet_exporters():
    """torch.export prints the graph it gave up on (pages, on stderr) and logs warnings before raising;
    the error it raises is what we say, in one line."""
    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def _first_line(err: BaseException) -> str:
    while err.__cause__ is not None:  # torch.onnx wraps torch.export's error in one about its steps
        err = err.__cause__
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))  # colour codes
    return next((line.strip() for line in text.splitlines() if line.strip()), type(err).__name__)


@dataclass
class Exported:
    out: Path
    student: Student
    check: Check
    latency: dict[str, tuple[float, float]] | None  # {"pytorch": (median, iqr), fmt: ...} in ms


def export_run(run_dir: Path, fmt: str, out: Path | None = None, tolerance: float = TOLERANCE,
               latency: bool = False) -> Exported:
    """Export a distill run's deployable student to `out` (default RUN/student<suffix>) after checking it;
    a refusal or a failed check writes nothing."""
    check_format(fmt)
    if not tolerance > 0:
        raise ExportError(f"--tolerance must be a positive number, got {tolerance}")
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / f"student{FORMATS[fmt]}"
    if out.is_dir():
        raise ExportError(f"--out '{out}' is a directory; name the file to write")
    student = deployable_student(run_dir)
    inputs, described = held_out_inputs(student)
    try:
        with _quiet_exporters():
            data = export_bytes(student.model, torch.cat([inputs, inputs])[:2], fmt)  # a batch of 2, even of 1 input
        run = runner(data, fmt)
    except Exception as err:  # the exporters' errors run to pages: the first line of the innermost says why
        raise ExportError(f"{fmt} export of '{student.file}' failed: {_first_line(err)}; "
                          f"try another --format") from None
    check = compare(student.model, run, inputs, described, tolerance)
    if not check.passed:
        raise ExportError(f"the {fmt} export of '{student.file}' differs from PyTorch by {check.max_abs_diff:.3g} "
                          f"on {described}, over the tolerance {check.tolerance:.3g}; nothing written (a larger "
                          f"--tolerance accepts it)")
    atomic_write(out, lambda f: f.write(data))
    timings = None
    if latency:
        shape = tuple(inputs.shape[1:])
        timings = {"PyTorch": batch1_latency(student.model, shape), fmt: batch1_latency(run, shape)}
    return Exported(out, student, check, timings)
