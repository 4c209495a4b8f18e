"""Seeds. Each randomised pass (SLM training, LLM tuning, sampling) draws from its own seeded RNG.

Dropout and sampling draw from torch's global RNG. Were they to share it, a client's local training
would depend on what the server happened to run before it (in virtual time), and so on the method being
compared: the same client, seed and data would train differently under CrossLM and under a baseline.
`own_rng` forks the global state for the duration of one pass, seeds it, and restores it afterwards.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

# Every randomised pass's seed, in one place: pass -> (multiplier of its base seed, offset). The base is
# the run's seed, or for a client's own passes the client's seed; the step is the client index (for
# "client"), the client's local round, or the server update.
_PASSES = {
    "client": (101, 0),  # a client's seed: run seed, client index
    "local_round": (1000, 0),  # a client's local training: client seed, round
    "extra_epochs": (1000, 500),  # standalone's matched extra epochs: client seed, round
    "final_round": (1000, 300),  # the local round after the run's last update: client seed, round
    "generate": (100_003, 0),  # the LLM's sampling: run seed, update
    "tune_llm": (7919, 0),  # the adapter's batches: run seed, update
    "distil": (31, 0),  # distillation into the SLMs: run seed, update
    "validation": (1000, 900),  # the client's held-out validation part: client seed, 0
    "accept": (1000, 700),  # the acceptance rule's bootstrap draws: client seed, update
    "signal": (613, 0),  # the bootstrap bound of the ensemble's label separation: run seed, update
}


def pass_seed(base: int, name: str, step: int) -> int:
    """The seed of one randomised pass (see `_PASSES`): distinct per pass, step and base seed."""
    multiplier, offset = _PASSES[name]
    return base * multiplier + step + offset


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextmanager
def own_rng(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """Run the block with torch's RNG (CPU, and `device` if it is a GPU) seeded to `seed`; the state
    from before the block is restored afterwards, so the block neither depends on nor disturbs it."""
    devices: list[int] = []
    if device is not None and device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
