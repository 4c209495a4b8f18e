"""An independent judge of synthetic data: an SLM trained centrally on the task's full training split.

It is used only to measure label fidelity (does a synthetic text carry its intended label?) and is
never seen by any method. It is trained once per (dataset, seed, size) and cached outside the repo.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from crosslm.catalogue.models import cache_dir, load_slm
from crosslm.io import atomic_dir, atomic_write_json
from crosslm.modeling.slm import evaluate, predict_logits, train_supervised
from crosslm.task import LabelledTexts, TaskSpec

JUDGE_SLM = "minilm-l6"


def judge_training_data(
    data: LabelledTexts, global_test_idx: list[int], max_examples: int, seed: int
) -> LabelledTexts:
    """Every example outside the global test split (a seeded subset of at most `max_examples`)."""
    held_out = set(global_test_idx)
    idx = [i for i in range(len(data)) if i not in held_out]
    g = torch.Generator().manual_seed(seed)
    idx = [idx[int(i)] for i in torch.randperm(len(idx), generator=g)[:max_examples]]
    return data.subset(sorted(idx))


def load_judge(
    task: TaskSpec, train: LabelledTexts, global_test: LabelledTexts, *, epochs: int, seed: int
) -> tuple[Any, Any, dict[str, Any]]:
    """The judge for this task and training set, trained now or loaded from the cache."""
    key = hashlib.sha256(
        json.dumps([task.name, list(task.labels), train.texts, train.labels, epochs, seed]).encode()
    )
    path = cache_dir() / "judges" / f"{task.name}-{key.hexdigest()[:16]}"
    if (path / "judge.json").is_file():
        model, tok = load_slm(str(path), list(task.labels))
        return model, tok, json.loads((path / "judge.json").read_text())
    model, tok = load_slm(JUDGE_SLM, list(task.labels))
    train_supervised(model, tok, train, task.num_labels, epochs=epochs, lr=2e-4, batch_size=32, max_length=128,
                     seed=seed, desc=f"judge for {task.name}")  # fmt: skip
    info = {"slm": JUDGE_SLM, "train_size": len(train), "epochs": epochs, "seed": seed,
            "global_test": evaluate(model, tok, global_test, task.num_labels, batch_size=64, max_length=128)}  # fmt: skip

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        atomic_write_json(tmp / "judge.json", info)

    atomic_dir(path, write)
    return model, tok, info


def judge_predictions(model: Any, tok: Any, texts: list[str]) -> list[int]:
    """The judge's label for each text."""
    return predict_logits(model, tok, texts, batch_size=64, max_length=128).argmax(-1).tolist()


def label_fidelity(model: Any, tok: Any, texts: list[str], labels: list[int]) -> float:
    """Share of texts the judge assigns their intended label."""
    if not texts:
        return float("nan")
    pred = torch.tensor(judge_predictions(model, tok, texts))
    return float((pred == torch.tensor(labels)).float().mean())
