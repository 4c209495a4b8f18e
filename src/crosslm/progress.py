"""Progress for every slow phase: a tqdm bar with ETA on a terminal, one plain line per phase elsewhere.

Redirected output (CI, `make run > log`) would otherwise fill with carriage-return bar frames; there a
phase prints "<desc>: <count> <unit> in <seconds> s" once, when it ends. CROSSLM_PROGRESS=bars or =lines
forces either form.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

from tqdm.auto import tqdm


def use_bars() -> bool:
    forced = os.environ.get("CROSSLM_PROGRESS", "").lower()
    if forced in ("bars", "lines"):
        return forced == "bars"
    return sys.stderr.isatty()


class PhaseLine:
    """The part of tqdm's interface crosslm uses, printing one summary line when the phase closes."""

    def __init__(self, iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
                 unit: str = "it", disable: bool = False, **_: Any):  # fmt: skip
        self.iterable, self.desc, self.unit, self.disable = iterable, desc, unit, disable
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)  # type: ignore[arg-type]
        self.n = 0
        self.postfix = ""
        self.start = time.perf_counter()
        self.closed = False

    def __iter__(self) -> Iterator:
        assert self.iterable is not None
        try:
            for item in self.iterable:
                yield item
                self.n += 1
        finally:
            self.close()

    def __enter__(self) -> PhaseLine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, **kw: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in kw.items())

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def write(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.closed or self.disable:
            return
        self.closed = True
        count = f"{self.n}/{self.total}" if self.total is not None and self.total != self.n else f"{self.n}"
        tail = f" ({self.postfix})" if self.postfix else ""
        unit = self.unit if self.n == 1 or self.unit == "it" or self.unit.endswith("s") else self.unit + "s"
        self.write(f"{self.desc}: {count} {unit} in {time.perf_counter() - self.start:.1f} s{tail}")


def progress(iterable: Iterable | None = None, **kw: Any) -> Any:
    """`tqdm(iterable, **kw)` on a terminal, a `PhaseLine` elsewhere (same arguments)."""
    return tqdm(iterable, **kw) if use_bars() else PhaseLine(iterable, **kw)


def note(text: str) -> None:
    """A line for the user between progress bars (a bar's own write keeps the bar intact)."""
    if use_bars():
        tqdm.write(text, file=sys.stderr)
    else:
        print(text, file=sys.stderr, flush=True)
