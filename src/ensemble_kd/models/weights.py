"""Local weights files into a built model: safetensors or a torch state_dict, common wrappers unwrapped.

Read without pickle (safetensors) or with torch.load(weights_only=True). Training checkpoints
wrap the state_dict (`state_dict`, `model`, `module`, EMA copies, DDP's `module.` and
torch.compile's `_orig_mod.` prefixes); those are peeled off. A file that does not fit is
refused in one sentence naming the first missing and unexpected keys and the first shape
mismatch, before anything is copied into the model; so is one holding integer (or boolean)
tensors where the model has floating ones, which a cast would turn into whole numbers. Floating
tensors of a narrower type (fp16, bf16) are widened to the model's, said once per file.
"""

from __future__ import annotations

import pickle
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn


# Where training scripts put the weights, in the order tried: the trained weights before their EMA.
WRAPPER_KEYS = ("state_dict", "model", "module", "net", "model_state_dict", "state_dict_ema", "model_ema")
PREFIXES = ("module.", "_orig_mod.")
SHOWN = 3  # keys named per kind of mismatch
# safetensors header dtypes, for tensors of the file's shapes and types read from the header alone
HEADER_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                 "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
                 "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
_widened: set[str] = set()  # files already said to be widened, in this process


class UnreadableFile(ValueError):
    """A torch file that torch.load(weights_only=True) cannot read; the message names it."""


def torch_load(path: str | Path, what: str, **kwargs) -> Any:
    """torch.load(weights_only=True) of `what` (e.g. "checkpoint"); a file it cannot read is named in a
    UnreadableFile saying whether it is damaged or holds more than tensors, and never relays
    torch's advice to load it with weights_only=False (which would run whatever code it holds)."""
    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols say nothing a user can act on
            warnings.simplefilter("ignore")
            return torch.load(path, weights_only=True, **kwargs)
    except PermissionError:
        raise
    except Exception as err:  # miniz, pickle, EOF, EINVAL, KeyError on garbage: all one case to the user
        raise UnreadableFile(f"{what} '{path}' {_unreadable(Path(path), err)}") from None


def _unreadable(path: Path, err: Exception) -> str:
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err)) if isinstance(err, pickle.UnpicklingError) else None
    if found:
        return (f"holds Python objects besides tensors and plain containers (first {found[1]}), which are not "
                f"loaded (unpickling them could run any code): it is no plain checkpoint or state_dict")
    size = path.stat().st_size
    with path.open("rb") as f:
        zipped = f.read(4) == b"PK\x03\x04"
    if size == 0:
        return "is empty (damaged: a write that never finished)"
    if zipped:
        return f"is damaged: a torch file of {size} bytes that is truncated or corrupt"
    return f"is damaged or not a file torch.save wrote ({size} bytes it cannot read as one)"


def read_state_dict(path: str | Path, shapes_only: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file, or the state_dict inside a .pt/.pth/.bin file.

    shapes_only: tensors with the file's shapes whose values are not read (meta tensors from a
    safetensors header, memory-mapped ones from a torch file): enough to check a file fits
    before any work starts, at a fraction of a load."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file '{path}' does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        try:
            if shapes_only:
                with safe_open(str(path), framework="pt") as f:
                    return {k: torch.empty(f.get_slice(k).get_shape(), device="meta",
                                           dtype=HEADER_DTYPES.get(f.get_slice(k).get_dtype(), torch.uint8))
                            for k in f.keys()}
            return load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise ValueError(f"weights file '{path}' is not a readable safetensors file ({err})") from None
    try:
        try:
            obj = torch_load(path, "weights file", map_location="cpu", mmap=shapes_only)
        except UnreadableFile:
            if not shapes_only:
                raise
            obj = torch_load(path, "weights file", map_location="cpu")  # the legacy format cannot be mapped
    except UnreadableFile as err:
        raise UnreadableFile(f"{err}; save the weights with torch.save(model.state_dict()) or as safetensors") from None
    state = _find_state_dict(obj)
    if state is None:
        keys = ", ".join(map(repr, list(obj)[:6])) if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"weights file '{path}' holds no state_dict (found {keys}); expected a mapping of "
                         f"parameter names to tensors, or one under {', '.join(WRAPPER_KEYS)}")
    return _strip_prefixes(state)


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _find_state_dict(obj, depth: int = 0) -> dict | None:
    if _is_state_dict(obj):
        return obj
    if not isinstance(obj, dict) or depth > 2:
        return None
    for key in WRAPPER_KEYS:
        if key in obj:
            found = _find_state_dict(obj[key], depth + 1)
            if found is not None:
                return found
    return None


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop `module.` / `_orig_mod.` when every key has it (DDP and torch.compile add them)."""
    changed = True
    while changed:
        changed = False
        for prefix in PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
    return state


def mismatch(model: nn.Module, state: dict[str, torch.Tensor]) -> str | None:
    """What differs between `state` and the model's own state_dict, in a clause; None when it fits."""
    own = model.state_dict()
    # Old checkpoints lack BatchNorm's step counter; load_state_dict fills it in.
    missing = [k for k in own if k not in state and not _is_counter(k)]
    unexpected = sorted((k for k in state if k not in own), key=_is_counter)  # counters last: weights tell more
    shapes = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in own.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys ({_first(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys ({_first(unexpected)})")
    if shapes:
        key, got, want = shapes[0]
        parts.append(f"{len(shapes)} shape mismatches (first '{key}': {list(got)} in the file, "
                     f"{list(want)} in the model)")
    return "; ".join(parts) or None


def _is_counter(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def arch_name(model: nn.Module) -> str:
    return getattr(model, "spec", {}).get("name", type(model).__name__)


def check_fits(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise one ValueError naming what differs between `state` and the model's own state_dict."""
    why = mismatch(model, state)
    if why is not None:
        raise ValueError(f"{source} does not fit architecture {arch_name(model)!r}: {why}; check `arch` and its "
                         f"kwargs against the network the weights were saved from")


def _first(keys: list[str]) -> str:
    shown = ", ".join(f"'{k}'" for k in keys[:SHOWN])
    return shown + (", ..." if len(keys) > SHOWN else "")


def _fits_as(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> str:
    """"whole" when `state` is the model's own, "base" when it is the plain base network's of a
    model built over one (a BatchEnsemble or multi-headed student: it has `plain_base()` and
    `load_base_state()`); otherwise one ValueError naming what differs."""
    if not hasattr(model, "load_base_state"):
        check_fits(model, state, source)
        return "whole"
    own = mismatch(model, state)
    if own is None:
        return "whole"
    base = model.plain_base()
    if (of_base := mismatch(base, state)) is not None:
        raise ValueError(f"{source} fits neither architecture {arch_name(model)!r} ({own}) nor its base "
                         f"{arch_name(base)!r} ({of_base}); check `arch` and its kwargs against the network "
                         f"the weights were saved from")
    return "base"


def _check_types(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Refuse non-floating tensors for the model's floating ones (a cast makes them whole numbers,
    small weights all zeros, and the network trains from nothing); say once that narrower floating
    ones are widened."""
    own = model.state_dict()
    pairs = [(k, state[k].dtype, v.dtype) for k, v in own.items()
             if k in state and v.dtype.is_floating_point and state[k].dtype != v.dtype]
    bad = [(k, got, want) for k, got, want in pairs if not got.is_floating_point]
    if bad:
        key, got, want = bad[0]
        raise ValueError(f"weights file '{path}' holds {len(bad)} non-floating tensors where the model has floating "
                         f"ones (first '{key}': {str(got).removeprefix('torch.')} in the file, "
                         f"{str(want).removeprefix('torch.')} in the model); a cast would make them whole numbers: "
                         f"save the trained floating-point weights")
    narrow = [(k, got, want) for k, got, want in pairs if got.itemsize < want.itemsize]
    if narrow and str(path) not in _widened:
        _widened.add(str(path))
        kinds = sorted({str(got).removeprefix("torch.") for _, got, _ in narrow})
        print(f"note: weights file '{path}' holds {'/'.join(kinds)} tensors; they are loaded as the model's "
              f"{str(narrow[0][2]).removeprefix('torch.')}", file=sys.stderr, flush=True)


def check_weights(model: nn.Module, path: str | Path) -> None:
    """Refuse, as load_weights would, a file that does not fit `model` (which may live on the meta
    device), reading only its keys, shapes and types."""
    state = read_state_dict(path, shapes_only=True)
    _check_types(model if _fits_as(model, state, f"weights file '{path}'") == "whole" else model.plain_base(),
                 state, path)


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Copy the weights in `path` into `model` (all of them, every key matched), returning it.

    A model built over a plain base network (a BatchEnsemble or multi-headed student) also takes
    that base's weights, e.g. a timm ResNet-50's, the way `pretrained: true` gives it the library's.
    """
    state = read_state_dict(path)
    if _fits_as(model, state, f"weights file '{path}'") == "base":
        _check_types(model.plain_base(), state, path)
        model.load_base_state(state)
    else:
        _check_types(model, state, path)
        model.load_state_dict(state, strict=True)
    return model
