"""Training and inference of an SLM sequence classifier.

One loop serves both local training (targets = one-hot labels of private data) and the server's
distillation (targets = soft KD distributions over synthetic data): the loss is always the cross-entropy
between a target distribution and the model's softmax.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from crosslm import precision
from crosslm.modeling.metrics import classification_metrics
from crosslm.progress import progress
from crosslm.seeding import own_rng
from crosslm.task import LabelledTexts


def soft_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """mean_i w_i * -sum_c targets[i,c] log softmax(logits)[i,c]; equals CE when targets are one-hot and
    there are no weights."""
    per_example = -(targets * torch.log_softmax(logits, dim=-1)).sum(-1)
    return (per_example if weights is None else weights * per_example).mean()


def log_prior(label_counts: Sequence[int]) -> torch.Tensor:
    """log of the Laplace-smoothed label distribution of a client's training data."""
    c = torch.tensor(label_counts, dtype=torch.float) + 1.0
    return torch.log(c / c.sum())


def _batches(n: int, size: int, generator: torch.Generator | None = None) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    return [order[i : i + size] for i in range(0, n, size)]


def fit(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    targets: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    max_length: int,
    seed: int,
    desc: str = "train",
    weight_decay: float = 0.01,
    autocast: str = "float32",
    logit_offset: torch.Tensor | None = None,
    sample_weights: torch.Tensor | None = None,
    max_steps: int | None = None,
    anchor: torch.Tensor | None = None,
    anchor_weight: float = 0.0,
) -> float:
    """Train `model` in place on (texts, target distributions). Returns the mean loss of the last epoch.

    `autocast` bfloat16 (or auto, where bfloat16 runs faster here) runs the forward passes under torch
    autocast; weights, gradients and AdamW stay float32 (mixed precision). Shuffling and dropout draw
    only from `seed`, so the result does not depend on what ran before in the process. `logit_offset` [C]
    is added to the logits inside the loss only (training), never at inference (logit adjustment).
    `sample_weights` [N] (mean 1) weight each example's loss. `max_steps` replaces `epochs` by a number of
    optimizer steps (passes over the data repeat until it is reached). `anchor` [N, C] adds
    `anchor_weight` times the cross-entropy of the plain logits toward those distributions (the label
    loss gets 1 - anchor_weight): learning without forgetting toward a model the client adopted."""
    if len(texts) == 0:
        return float("nan")
    device = precision.model_device(model)
    offset = logit_offset.to(device) if logit_offset is not None else None
    per_epoch = (len(texts) + batch_size - 1) // batch_size
    total_steps = max_steps if max_steps else epochs * per_epoch
    epochs = -(-total_steps // per_epoch)
    with own_rng(seed, device):
        amp = precision.autocast(autocast, device)
        gen = torch.Generator().manual_seed(seed)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / max(total_steps, 1))
        last = float("nan")
        step = 0
        with progress(total=total_steps, desc=desc, leave=False, unit="step") as bar:
            for _ in range(epochs):
                losses = []
                for idx in _batches(len(texts), batch_size, gen):
                    if step == total_steps:
                        break
                    step += 1
                    enc = tokenizer(
                        [texts[i] for i in idx],
                        truncation=True,
                        max_length=max_length,
                        padding=True,
                        return_tensors="pt",
                    ).to(device)
                    with amp:
                        logits = model(**enc).logits
                    logits = logits.float()
                    w = sample_weights[idx].to(device) if sample_weights is not None else None
                    loss = soft_cross_entropy(
                        logits if offset is None else logits + offset, targets[idx].to(device), w
                    )
                    if anchor is not None and anchor_weight > 0:
                        loss = (1.0 - anchor_weight) * loss + anchor_weight * soft_cross_entropy(
                            logits, anchor[idx].to(device), w
                        )
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                    opt.step()
                    sched.step()
                    losses.append(loss.item())
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss.item():.3f}")
                if losses:
                    last = sum(losses) / len(losses)
    model.eval()
    return last


def train_supervised(
    model: Any, tokenizer: Any, data: LabelledTexts, num_labels: int, logit_adjust: float = 0.0, **kwargs: Any
) -> float:
    """Cross-entropy on one-hot labels. With `logit_adjust` t > 0 the loss sees logits + t * log prior
    (the label distribution of `data`): a label-skewed silo then learns a classifier that is not biased
    toward its majority labels, and a label it barely holds is not pushed down, so what a server reply
    taught the model about it survives the next local round (logit adjustment, Menon et al. 2021).
    An `anchor` (see `fit`) is matched by the plain logits, without the adjustment."""
    targets = torch.nn.functional.one_hot(torch.tensor(data.labels), num_labels).float()
    offset = logit_adjust * log_prior(data.label_counts(num_labels)) if logit_adjust > 0 else None
    return fit(model, tokenizer, data.texts, targets, logit_offset=offset, **kwargs)


@torch.no_grad()
def predict_logits(
    model: Any, tokenizer: Any, texts: Sequence[str], *, batch_size: int = 64, max_length: int = 128
) -> torch.Tensor:
    """Logits [N, C], batched by similar length so padding stays small."""
    model.eval()
    device = precision.model_device(model)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty(len(texts), model.config.num_labels)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        enc = tokenizer(
            [texts[i] for i in idx], truncation=True, max_length=max_length, padding=True, return_tensors="pt"
        ).to(device)
        out[idx] = model(**enc).logits.float().cpu()
    return out


def evaluate(
    model: Any, tokenizer: Any, data: LabelledTexts, num_labels: int, **kwargs: Any
) -> dict[str, float]:
    preds = predict_logits(model, tokenizer, data.texts, **kwargs).argmax(-1).tolist()
    return classification_metrics(data.labels, preds, num_labels)
