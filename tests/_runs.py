"""What the run-directory tests read back: stderr as one sentence, a directory's files and bytes."""

from __future__ import annotations

from pathlib import Path


def one_sentence(capsys) -> str:
    """stderr, which must be one sentence: no traceback, its wrapped lines joined."""
    text = capsys.readouterr().err.strip()
    assert "Traceback" not in text
    return " ".join(text.split())


def files(run_dir) -> dict:
    """Every file and its bytes, the lock aside (it holds the pid of whoever took it last)."""
    return {p.relative_to(run_dir): p.read_bytes() for p in sorted(Path(run_dir).rglob("*")) if p.is_file()
            and p.name != ".lock"}
