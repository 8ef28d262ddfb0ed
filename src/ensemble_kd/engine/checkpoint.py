"""Checkpoints: written atomically, read with weights_only=True.

Two kinds of file:
- a training state (`last.pt`): model, optimizer, scheduler, method extras, RNG
  states, epoch and step, enough for `--resume` to continue bit for bit;
- a model file (`model.pt`): the plain state_dict, loadable into
  `ensemble_kd.models.create(name)` with an ordinary `load_state_dict`, beside the same
  tensors as `model.safetensors` (no pickle) and a `model.json` that names the
  architecture (its spec) and its metrics.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models.weights import UnreadableFile, torch_load

FORMAT = "ensemble-kd/train-state/1"


class CheckpointError(ValueError):
    pass


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write) -> None:
    """Write to a temporary file beside `path`, fsync, then rename over it.

    The file gets the mode any other new file would (0666 less the umask), not mkstemp's 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:  # a full disk: the file it was for named, the previous version left in place
        Path(tmp).unlink(missing_ok=True)
        cause = os_error(err)
        if cause is None or (cause is err and err.filename is not None):
            raise
        raise OSError(cause.errno, cause.strerror or str(cause), str(path)) from err


def os_error(err: BaseException) -> OSError | None:
    """The OSError behind `err`: itself, or the one torch.save's RuntimeError ("unexpected pos")
    was raised while handling when a write into its file failed (ENOSPC re-raised as RuntimeError)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def atomic_save(obj: Any, path: str | Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def load(path: str | Path, map_location="cpu") -> Any:
    """torch.load with weights_only=True and errors that say what the file is not."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    try:
        return torch_load(path, "checkpoint", map_location=map_location)
    except UnreadableFile as err:
        raise CheckpointError(str(err)) from None


def read_json(path: str | Path, remedy: str, keys: tuple[str, ...] = ()) -> dict:
    """A JSON object holding `keys`, or one sentence naming the file and `remedy` (what to do)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"'{path}' is damaged (not valid JSON: {err}); {remedy}") from None
    missing = [k for k in keys if not isinstance(data, dict) or k not in data]
    if missing or not isinstance(data, dict):
        raise ValueError(f"'{path}' is damaged (no {', '.join(missing) or 'object'} in it); {remedy}")
    return data


def load_train_state(path: str | Path, map_location="cpu") -> dict:
    state = load(path, map_location)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"'{path}' is not an ensemble-kd training state (no '{FORMAT}' tag)")
    return state


def save_model(model: nn.Module, path: str | Path, info: dict | None = None) -> None:
    """The plain state_dict, the same tensors as safetensors (no pickle: what timm's, torchvision's and
    the hub's loaders read) and a sidecar JSON with the model's spec."""
    from safetensors.torch import save as safetensors_bytes

    path = Path(path)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_save(state, path)
    # safetensors refuses tensors that share memory (tied weights): each gets its own copy
    tensors = {k: v.contiguous().clone() for k, v in state.items()}
    atomic_write(path.with_suffix(".safetensors"), lambda f: f.write(safetensors_bytes(tensors, {"format": "pt"})))
    sidecar = {"spec": getattr(model, "spec", None), **(info or {})}
    atomic_write_text(path.with_suffix(".json"), json.dumps(sidecar, indent=2))


_SIDECAR_REMEDY = "it is the model file's description: restore it, or train the model again"


def model_data(path: str | Path) -> dict | None:
    """The data a model file was trained on (data.dataset_record), from its sidecar; None if unrecorded."""
    sidecar = Path(path).with_suffix(".json")
    info = read_json(sidecar, _SIDECAR_REMEDY) if sidecar.is_file() else None
    return info.get("data") if isinstance(info, dict) else None


def trained_data(path: str | Path) -> dict | None:
    """model_data, or for a training state (last.pt) the record it holds itself."""
    record = model_data(path)
    if record is None and Path(path).suffix == ".pt":
        state = load(path)
        record = state.get("data") if isinstance(state, dict) and state.get("format") == FORMAT else None
    return record


def model_spec(path: str | Path) -> dict:
    """The architecture of a model file, from its sidecar JSON or its training state."""
    path = Path(path)
    sidecar = path.with_suffix(".json")
    if sidecar.is_file():
        spec = read_json(sidecar, _SIDECAR_REMEDY).get("spec")
        if spec:
            return spec
    state = load(path)
    if isinstance(state, dict) and state.get("format") == FORMAT:
        return state["model_spec"]
    raise CheckpointError(
        f"cannot tell the architecture of '{path}': it has no '{sidecar.name}' beside it")


def load_model(path: str | Path, map_location="cpu") -> nn.Module:
    """Rebuild a registered model from a model file or a training state."""
    from ..models import create

    path = Path(path)
    spec = dict(model_spec(path))
    state = load(path, map_location)
    if isinstance(state, dict) and state.get("format") == FORMAT:
        state = state["model"]
    model = create(spec.pop("name"), **spec)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(
            f"'{path}' does not fit architecture {model.spec}: "
            f"{str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else err}") from None
    return model.to(map_location)
