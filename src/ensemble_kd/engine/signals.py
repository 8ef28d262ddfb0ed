"""Ctrl-C and SIGTERM as a request to stop at the next safe point (a step, a batch), not at once."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Callable


@contextlib.contextmanager
def on_stop_signals(request: Callable[[], None]):
    """While inside, Ctrl-C and SIGTERM call `request()` (which may raise KeyboardInterrupt to stop at
    once, e.g. at a second Ctrl-C); the previous handlers come back on exit. Only the main thread may
    set handlers: elsewhere the signals keep theirs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, lambda signum, frame: request()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
