"""Compute precision, one rule for every pass: float32, bfloat16, or auto (bfloat16 only where a matmul
probe on this machine runs it faster; on some CPUs of this project's kind bfloat16 was slower).

Used by sampling and LLM evaluation (bfloat16 weights) and by adapter tuning, SLM training and
distillation (bfloat16 autocast; weights, gradients and the optimizer stay float32).
"""

from __future__ import annotations

import functools
import time
from typing import Any

COMPUTE_DTYPES = ("auto", "float32", "bfloat16")


@functools.lru_cache(maxsize=1)
def bf16_is_faster(hidden: int = 576, rows: int = 48) -> bool:
    """Probe (~50 ms): does a decode-shaped matmul run faster in bfloat16 than float32 on this machine?"""
    import torch

    def seconds(dtype: torch.dtype) -> float:
        x, w = torch.randn(rows, hidden, dtype=dtype), torch.randn(4 * hidden, hidden, dtype=dtype)
        torch.nn.functional.linear(x, w)
        t0 = time.perf_counter()
        for _ in range(20):
            torch.nn.functional.linear(x, w)
        return time.perf_counter() - t0

    return seconds(torch.bfloat16) * 1.2 < seconds(torch.float32)


def resolve_dtype(name: str) -> Any:
    """The torch dtype for a configured name (one of COMPUTE_DTYPES)."""
    import torch

    if name not in COMPUTE_DTYPES:
        raise ValueError(f"compute dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {name!r}")
    if name == "auto":
        return torch.bfloat16 if bf16_is_faster() else torch.float32
    return getattr(torch, name)


def autocast(name: str) -> Any:
    """A reusable CPU autocast context: bfloat16 when `name` resolves to it, a no-op otherwise."""
    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=resolve_dtype(name) == torch.bfloat16)


def dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")
