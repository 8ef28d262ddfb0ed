"""Who may write in a run directory, and whether a run there is the run asked for.

A run directory belongs to one run. It is locked while a process writes in it (flock: the
OS releases the lock when the process dies, so a killed run leaves none behind); a run
already there is never taken over unless asked (`--resume` continues it, `--overwrite`
replaces it); and a run is continued or reused only when its resolved config, and the
teachers it read, equal what is asked for now, up to the keys in RESUME_SAFE.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from ..config import Config, ConfigError, load_config
from .. import distributed
from .checkpoint import atomic_write_text, read_json

LOCK = ".lock"
FINGERPRINT = "fingerprint.json"
# Keys that cannot change what a run computes, so a resumed run may take new values for them.
RESUME_SAFE = ("device", "*.log_every", "*.checkpoint_every", "eval.*", "run.*", "logging.*")
_UNSET = "unset"


class RunDirError(ValueError):
    """A run directory that cannot be used as asked; the message says what to do."""


# ---------------------------------------------------------------------- comparing runs

def flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A config tree as {dotted key: leaf value}; empty sections and lists are leaves."""
    if isinstance(tree, dict) and tree:
        return {k: v for key, value in tree.items() for k, v in flat(value, f"{prefix}{key}.").items()}
    if isinstance(tree, list) and tree:
        return {k: v for i, value in enumerate(tree) for k, v in flat(value, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): tree}


def _weight_files(config: Config) -> dict[str, Path]:
    """The files whose bytes decide the weights a run starts from or reads, by the config key naming them:
    a retrained source changes its manifest, a rebuilt cache its cache.json, a replaced weights file itself."""
    files = {}
    if config.teachers.source:
        files["teachers.source"] = Path(config.teachers.source) / "manifest.json"
    elif config.teachers.members:  # a teacher set loaded from weights files
        files.update({f"teachers.members.{i}.weights": Path(m.weights)
                      for i, m in enumerate(config.teachers.members) if m.weights})
    if config.teachers.cache:
        files["teachers.cache"] = Path(config.teachers.cache) / "cache.json"
    if config.student.weights:
        files["student.weights"] = Path(config.student.weights)
    return {key: path for key, path in files.items() if path.is_file()}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):  # weights files can be gigabytes
            digest.update(chunk)
    return digest.hexdigest()


def teachers_fingerprint(config: Config) -> dict[str, str]:
    """sha256 of each file in _weight_files, by its config key."""
    return {key: _sha256(path) for key, path in _weight_files(config).items()}


def saved_config(run_dir: Path, overrides=()) -> Config:
    """The resolved config a run wrote, with overrides applied on top."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"'{run_dir}' has no config.yaml: is it an ensemble-kd run directory?")
    return load_config(path, list(overrides))


HEADER = "# ensemble-kd "  # config.yaml's first line: the command (and its options) that made the run


def recorded_command(run_dir: Path) -> list[str]:
    """The command line a run directory was made by, from its config.yaml ([] when it says none)."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return []
    with path.open(errors="replace") as f:
        first = f.readline().strip()
    return first[len(HEADER):].split() if first.startswith(HEADER) else []


def check_command(run_dir: Path, command: str) -> None:
    """A run is continued only by the command that made it: a distill run is no place for teachers."""
    made = recorded_command(run_dir)
    if made and made[0] != command:
        raise RunDirError(f"cannot resume '{run_dir}' with {command}: it holds a {made[0]} run; continue it with "
                          f"`ensemble-kd {made[0]} --resume {run_dir}`, or start a new {command} run elsewhere")


def run_changes(run_dir: Path, now: Config, allowed: tuple[str, ...] = RESUME_SAFE) -> list[str]:
    """What differs between the run in run_dir and `now`, as 'key (old -> new)', keys in `allowed` aside."""
    old, new = flat(saved_config(run_dir).model_dump(mode="json")), flat(now.model_dump(mode="json"))
    changes = [f"{key} ({old.get(key, _UNSET)!r} -> {new.get(key, _UNSET)!r})"
               for key in [*new, *(k for k in old if k not in new)]
               if old.get(key, _UNSET) != new.get(key, _UNSET)
               and not any(fnmatch.fnmatchcase(key, pattern) for pattern in allowed)]
    path = Path(run_dir) / FINGERPRINT
    made = read_json(path, "delete it (the teachers then go unchecked) or start a new run") if path.is_file() else {}
    current, files = teachers_fingerprint(now), _weight_files(now)
    changes += [f"{key} (its {files[key].name} changed since the run was made)"
                for key in sorted(set(made) & set(current)) if made[key] != current[key]]
    return changes


def check_resumable(run_dir: Path, now: Config, allowed: tuple[str, ...] = RESUME_SAFE) -> None:
    changes = run_changes(run_dir, now, allowed)
    if changes:
        safe = ", ".join(allowed)
        raise RunDirError(f"cannot resume '{run_dir}' with {'; '.join(changes)}: that changes what the run computes "
                          f"(only {safe} may change on resume); start a new run with another run.name instead")


def write_fingerprint(run_dir: Path, config: Config, listing: dict | None = None) -> None:
    found = teachers_fingerprint(config)
    if listing is not None:
        found[LISTING] = listing
    if found and distributed.world().is_main:
        atomic_write_text(Path(run_dir) / FINGERPRINT, json.dumps(found, indent=2))


# ---------------------------------------------------------------------- the data a streamed run reads

LISTING = "data.listing"
ACCEPT_LISTING = "--accept-changed-data"


def data_listing(train) -> dict | None:
    """The listing of a streamed training set (its sample count and a hash of its files' names, sizes and
    labels): read afresh by every process, so a resumed run must find it unchanged. None for data in memory."""
    digest = getattr(train, "digest", None)
    return {"samples": len(train), "hash": digest()} if callable(digest) else None


def listing_change(run_dir: Path, listing: dict | None) -> str | None:
    """How the training listing differs from the one the run in run_dir recorded (None: it does not)."""
    path = Path(run_dir) / FINGERPRINT
    made = read_json(path, "delete it (the teachers then go unchecked) or start a new run").get(LISTING) \
        if path.is_file() else None
    if listing is None or made is None or made == listing:
        return None
    before, now = made.get("samples"), listing["samples"]
    return (f"{before} -> {now} samples: files were {'added' if now > before else 'deleted'}" if before != now
            else f"the same {now} samples, but other files, sizes or labels")


def check_listing(run_dir: Path, listing: dict | None, accept: bool) -> None:
    change = listing_change(run_dir, listing)
    if change and not accept:
        raise RunDirError(f"cannot resume '{run_dir}': its training listing changed since the run began ({change}), "
                          f"so it would train on neither the old data nor the new; restore the files, start a new "
                          f"run, or pass {ACCEPT_LISTING} to go on with them")


# ---------------------------------------------------------------------- claiming a directory

_HELD: set[int] = set()  # the descriptors of the run locks this process holds


def _drop_inherited_locks() -> None:
    """In a forked child (a DataLoader worker): close the run locks' descriptors. A flock belongs to the
    open file, which a fork shares: a worker left holding it would keep the lock past its parent's death.
    Closing is not unlocking: the parent keeps its lock."""
    for fd in _HELD:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


class RunLock:
    """An exclusive flock on run_dir/.lock, held while this process writes in the directory (and only it:
    forked children drop it)."""

    def __init__(self, run_dir: Path, key: str = "run.name"):
        self.run_dir, self.key, self.fd = Path(run_dir), key, None  # key: what names the directory

    def __enter__(self) -> RunLock:
        path = self.run_dir / LOCK
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            pid = f" (pid {holder})" if holder else ""
            raise RunDirError(f"run directory '{self.run_dir}' is in use by another ensemble-kd process{pid}; "
                              f"wait for it to finish, or choose another {self.key}") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        _HELD.add(fd)
        return self

    def __exit__(self, *exc) -> bool:
        if self.fd is not None:
            _HELD.discard(self.fd)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
        return False


def contents(run_dir: Path) -> list[Path]:
    """What a directory holds besides its lock file (nothing when it does not exist)."""
    run_dir = Path(run_dir)
    return [p for p in run_dir.iterdir() if p.name != LOCK] if run_dir.is_dir() else []


def clear(run_dir: Path) -> None:
    """Empty a run directory for --overwrite (its lock, held by the caller, stays)."""
    for path in contents(run_dir):
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def finished(run_dir: Path) -> bool:
    return (Path(run_dir) / "results.json").is_file() or (Path(run_dir) / "cache.json").is_file()


def _refusal(run_dir: Path) -> str:
    if finished(run_dir):
        return (f"run directory '{run_dir}' holds a finished run; choose another run.name, "
                f"or pass --overwrite to replace it")
    if (run_dir / "config.yaml").is_file():
        return (f"run directory '{run_dir}' holds an unfinished run; continue it with --resume {run_dir}, "
                f"or pass --overwrite to start it again")
    return f"'{run_dir}' is not empty and holds no ensemble-kd run; choose another run.name or run.dir"


def _fresh_dir(config: Config, command: str) -> Path:
    """runs/<run.name>, or runs/<command>-<time>[-k] made atomically: two runs started together get two."""
    root = Path(config.run.dir)
    root.mkdir(parents=True, exist_ok=True)
    if config.run.name is not None:
        path = root / config.run.name
        path.mkdir(exist_ok=True)
        return path
    name, suffix = f"{command}-{time.strftime('%Y%m%d-%H%M%S')}", 1
    while True:
        path = root / (name if suffix == 1 else f"{name}-{suffix}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            suffix += 1


def _claim(config: Config, command: str, resume: str | None, overwrite: bool, shared: bool,
           reentrant: bool, key: str, stack: contextlib.ExitStack) -> Path:
    """Rank 0's claim: the directory created (or checked) and, unless shared, locked until `stack` closes."""
    if resume is not None:
        path = Path(resume)
        if not (path / "config.yaml").is_file():
            raise FileNotFoundError(f"cannot resume '{path}': it is not a run directory (no config.yaml)")
        if not shared:
            stack.enter_context(RunLock(path, key))
        return path
    path = _fresh_dir(config, command)
    if shared:  # a sweep: its runs lock themselves, and several processes may share it (--only)
        if contents(path) and recorded_command(path)[:1] != [command]:
            if not overwrite:
                raise RunDirError(_refusal(path))
            clear(path)
        return path
    stack.enter_context(RunLock(path, key))
    if contents(path) and (overwrite or not reentrant):  # reentrant: the command resumes what it finds
        if not overwrite:
            raise RunDirError(_refusal(path))
        clear(path)
    return path


def on_main(fn):
    """fn() on rank 0 only; its value on every rank, and its RunDirError or OSError raised on every rank."""
    value, failure = None, None
    if distributed.world().is_main:
        try:
            value = fn()
        except (RunDirError, OSError) as err:
            failure = err
    message = distributed.broadcast_object(None if failure is None else str(failure))
    if failure is not None:
        raise failure
    if message is not None:
        raise RunDirError(message)
    return distributed.broadcast_object(value)


@contextlib.contextmanager
def claim_run_dir(config: Config, command: str, *, resume: str | None = None, overwrite: bool = False,
                  shared: bool = False, reentrant: bool = False, key: str = "run.name"):
    """The run's directory, created and locked for the duration of the block; one name for all ranks.

    Call it once everything the run needs has been checked: nothing is written before. `shared`:
    not locked, as several processes share it (a sweep; its runs lock themselves); `reentrant`: what
    is there is continued, not refused (a teacher cache resumes or rebuilds itself); `key`: the config
    key that names the directory, for the messages (run.name, or a cache's cache.dir).
    """
    with contextlib.ExitStack() as stack:
        yield Path(on_main(lambda: str(_claim(config, command, resume, overwrite, shared, reentrant, key, stack))))


@contextlib.contextmanager
def locked(run_dir: Path):
    """run_dir created and locked by rank 0 for the duration of the block."""
    def take(stack):
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        stack.enter_context(RunLock(run_dir))
    with contextlib.ExitStack() as stack:
        on_main(lambda: take(stack))
        yield Path(run_dir)
