"""Ctrl-C (and SIGTERM) that cannot get lost.

Python raises KeyboardInterrupt wherever the main thread happens to be. When that is inside a finalizer
(a progress bar's `__del__`, say) the exception is printed as "ignored" and the run goes on as if nothing
happened. The CLI's handler also records the signal, and the runtime checks the record between events.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

_received = False


def _handler(signum: int, frame: Any) -> None:
    global _received
    _received = True
    raise KeyboardInterrupt


def install() -> None:
    """Use the recording handler for SIGINT and SIGTERM (main thread only; elsewhere Python keeps its
    own): a terminated run closes like an interrupted one, with run_end and a report."""
    global _received
    _received = False
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _handler)
        signal.signal(signal.SIGTERM, _handler)


def check() -> None:
    """Raise KeyboardInterrupt if Ctrl-C arrived, even if its first KeyboardInterrupt was swallowed."""
    if _received:
        raise KeyboardInterrupt
