"""Independent judges of synthetic data, trained centrally on the task's real data outside the global
test split and never seen by any method; each is trained once per (dataset, seed, size) and cached
outside the repo.

- Classification: an SLM classifier, for label fidelity (does a synthetic text carry its intended label?).
- Generation: a causal LM tuned on real (input, target) pairs (the writer judge), for how plausible a
  synthetic pair's target is given its input: its per-token perplexity of the synthetic targets, and the
  share of synthetic pairs whose target it finds at least as likely, per token, as the median real pair
  of the global test split.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from crosslm.catalogue.models import cache_dir, llm_path, load_causal_slm, load_slm
from crosslm.io import atomic_dir, atomic_write_json
from crosslm.modeling.causal_slm import PairFormat, fit_pairs, mean_target_loglik
from crosslm.modeling.slm import evaluate, predict_logits, train_supervised
from crosslm.task import GenerationPairs, LabelledTexts, TaskSpec

JUDGE_SLM = "minilm-l6"
JUDGE_WRITER = "smollm2-135m-instruct"
"""The writer judge's base: the only generative weights offline. It is tuned on real pairs only, so it
shares a starting point with the server's LLM but none of what any method trains it on."""


def judge_training_data(
    data: LabelledTexts | GenerationPairs, global_test_idx: list[int], max_examples: int, seed: int
) -> Any:
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
    _save_judge(path, model, tok, info)
    return model, tok, info


def _save_judge(path: Path, model: Any, tok: Any, info: dict[str, Any]) -> None:
    """Cache a trained judge (weights, tokenizer, judge.json) at `path`, all at once or not at all."""

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        atomic_write_json(tmp / "judge.json", info)

    atomic_dir(path, write)


def judge_predictions(model: Any, tok: Any, texts: list[str]) -> list[int]:
    """The judge's label for each text."""
    return predict_logits(model, tok, texts, batch_size=64, max_length=128).argmax(-1).tolist()


def label_fidelity(model: Any, tok: Any, texts: list[str], labels: list[int]) -> float:
    """Share of texts the judge assigns their intended label."""
    if not texts:
        return float("nan")
    pred = torch.tensor(judge_predictions(model, tok, texts))
    return float((pred == torch.tensor(labels)).float().mean())


def load_writer_judge(
    task: TaskSpec,
    train: GenerationPairs,
    global_test: GenerationPairs,
    *,
    fmt: PairFormat,
    epochs: int,
    seed: int,
    lr: float = 1e-4,
    base: str = JUDGE_WRITER,
) -> tuple[Any, Any, dict[str, Any]]:
    """The writer judge for this task and training pairs, tuned now (`epochs` passes over `train`, loss on
    the targets) or loaded from the cache. Its info holds its target perplexity of the global test split
    and the median per-token log-likelihood of those real pairs, the reference of `pair_quality`."""
    key = hashlib.sha256(
        json.dumps(
            [
                task.name,
                "writer",
                base,
                train.inputs,
                train.targets,
                fmt.max_input_tokens,
                fmt.max_target_tokens,
                fmt.target_noun,
                epochs,
                lr,
                seed,
            ]
        ).encode()  # fmt: skip
    )
    path = cache_dir() / "judges" / f"{task.name}-writer-{key.hexdigest()[:16]}"
    if (path / "judge.json").is_file():
        model, tok = load_causal_slm(str(path))
        return model, tok, json.loads((path / "judge.json").read_text())
    model, tok = load_causal_slm(llm_path(base))
    fit_pairs(model, tok, train.inputs, train.targets, lr=lr, batch_size=16, seed=seed, epochs=epochs, fmt=fmt,
              autocast="auto", desc=f"writer judge for {task.name}")  # fmt: skip
    real = mean_target_loglik(model, tok, global_test.inputs, global_test.targets, fmt=fmt)
    info = {"model": base, "train_size": len(train), "epochs": epochs, "seed": seed, "lr": lr,
            "global_test": {"target_perplexity": _perplexity(real), "n": len(global_test),
                            "median_loglik": float(real.median()) if len(real) else float("nan")}}  # fmt: skip
    _save_judge(path, model, tok, info)
    return model, tok, info


def _perplexity(logliks: torch.Tensor) -> float:
    """exp of minus the mean per-token log-likelihood over pairs (each pair weighs the same)."""
    return float(torch.exp(-logliks.mean())) if len(logliks) else float("nan")


def pair_quality(
    model: Any, tok: Any, inputs: list[str], targets: list[str], *, fmt: PairFormat, reference: float
) -> dict[str, float]:
    """The writer judge on synthetic pairs: its perplexity of their targets given their inputs (per token,
    each pair weighing the same) and the share of pairs whose per-token log-likelihood is at least
    `reference` (the median real pair's): how many synthetic headlines read as real ones for their
    leads. nan for no pairs."""
    if not inputs:
        return {"target_perplexity": float("nan"), "real_like": float("nan")}
    ll = mean_target_loglik(model, tok, inputs, targets, fmt=fmt)
    return {"target_perplexity": _perplexity(ll), "real_like": float((ll >= reference).float().mean())}
