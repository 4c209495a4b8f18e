"""Where and how models compute, one rule for every pass.

Device: auto (CUDA when this machine has it), cpu, cuda or cuda:N. Every pass (sampling, tuning, scoring,
training) runs on the device its model's parameters are on, so placing a model is the only decision.

Precision: float32, bfloat16, or auto. On a CPU auto means bfloat16 only where a matmul probe on this
machine runs it faster (on some CPUs of this project's kind bfloat16 was slower); on a GPU, bfloat16
wherever the GPU supports it. Used by sampling and LLM evaluation (bfloat16 weights) and by adapter tuning,
SLM training and distillation (bfloat16 autocast; weights, gradients and the optimizer stay float32).
"""

from __future__ import annotations

import functools
import platform
import re
import time
from typing import Any

COMPUTE_DTYPES = ("auto", "float32", "bfloat16")
DEVICE_NAME = re.compile(r"auto|cpu|cuda(:\d+)?")


@functools.lru_cache(maxsize=1)
def bf16_is_faster(hidden: int = 576, rows: int = 48, rounds: int = 5) -> bool:
    """Probe (~0.1 s): does a decode-shaped matmul run faster in bfloat16 than float32 on this machine?

    The question is one of kernels (does this CPU have fast bfloat16 instructions), so the probe runs on
    one thread and times the dtypes in alternating rounds, keeping each one's fastest. Timed on every
    thread, a second busy process turns the probe into a measure of thread-barrier waits: that once
    flipped a whole experiment to float32 on a CPU where bfloat16 is 3x faster."""
    import torch

    g = torch.Generator().manual_seed(0)  # not the global RNG: a probe must not shift a run's draws
    operands = {
        dtype: (
            torch.randn(rows, hidden, generator=g).to(dtype),
            torch.randn(4 * hidden, hidden, generator=g).to(dtype),
        )
        for dtype in (torch.bfloat16, torch.float32)
    }

    def seconds(dtype: torch.dtype) -> float:
        x, w = operands[dtype]
        t0 = time.perf_counter()
        for _ in range(10):
            torch.nn.functional.linear(x, w)
        return time.perf_counter() - t0

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for dtype in operands:  # warm-up: the first call of a kernel pays for its setup
            seconds(dtype)
        best = {dtype: float("inf") for dtype in operands}
        for _ in range(rounds):
            for dtype in operands:
                best[dtype] = min(best[dtype], seconds(dtype))
    finally:
        torch.set_num_threads(threads)
    return best[torch.bfloat16] * 1.2 < best[torch.float32]


def machine_info() -> dict[str, Any]:
    """What a run's numbers depend on beyond its config: torch's version, the CPU, the GPU, and whether
    `auto` precision picked bfloat16 on this CPU. bfloat16 kernels (and their choice) differ between CPUs,
    so the same config and seed reproduce a run exactly on the same machine only; run_start records this."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "torch": torch.__version__,
        "cpu": cpu,
        "cpu_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu_auto_dtype": "bfloat16" if bf16_is_faster() else "float32",
    }


def describe_machine(m: dict[str, Any]) -> str:
    """One line naming a `machine_info()` record, for reports: the same config and seed reproduce a run's
    numbers on such a machine only."""
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    return (
        f"{m.get('cpu', 'n/a')} ({m.get('cpu_threads', 'n/a')} threads{gpu}), torch {m.get('torch', 'n/a')}, "
        f"CPU precision auto = {m.get('cpu_auto_dtype', 'n/a')}"
    )


def resolve_device(name: str, key: str = "device") -> Any:
    """The torch device for a configured name (auto, cpu, cuda or cuda:N); `key` names the setting in
    the error a user sees when the name is wrong or this machine has no such GPU."""
    import torch

    from crosslm.errors import ConfigError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not DEVICE_NAME.fullmatch(name):
        raise ConfigError(f"config key '{key}' = {name!r}: expected auto, cpu, cuda or cuda:N.")
    if name.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(name.partition(":")[2] or 0)
        if index >= count:
            raise ConfigError(
                f"config key '{key}' = {name!r}, but this machine's torch sees {count} CUDA GPU(s); "
                "use auto or cpu here."
            )
    return torch.device(name)


def model_device(model: Any) -> Any:
    """The device a model computes on: that of its first parameter (the CPU for one without any)."""
    import torch

    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


def resolve_dtype(name: str, device: Any = "cpu") -> Any:
    """The torch dtype for a configured name (one of COMPUTE_DTYPES) on `device`."""
    import torch

    if name not in COMPUTE_DTYPES:
        raise ValueError(f"compute dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {name!r}")
    if name == "auto":
        if torch.device(device).type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return torch.bfloat16 if bf16_is_faster() else torch.float32
    return getattr(torch, name)


def autocast(name: str, device: Any = "cpu") -> Any:
    """A reusable autocast context on `device`: bfloat16 when `name` resolves to it, a no-op otherwise."""
    import torch

    kind = torch.device(device).type
    return torch.autocast(kind, dtype=torch.bfloat16, enabled=resolve_dtype(name, device) == torch.bfloat16)


def dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")
