"""Step 5: tune the LLM's LoRA adapter for S steps on L = L_QG + lambda_task * L_task + alpha * L_PR.

theta0 is the frozen base (the adapter disabled), so L_PR needs no second copy of the model. L_PR is
computed on the L_QG batch, at every generated-token position. `tune_steps` is the loop; each task kind
brings its generated texts and its L_task (`tune_adapter` for classification, the verbalizer on S+;
crosslm.server.generation_update for generation, the LLM writing S+ targets).
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from crosslm import precision
from crosslm.config import LLMConfig, TuneConfig
from crosslm.modeling.llm_text import (
    answer_ids,
    gather_logprobs,
    next_token_logits,
    pair_batch,
    user_prompt_ids,
)
from crosslm.progress import progress
from crosslm.seeding import own_rng
from crosslm.server.losses import probability_regularizer, qg_weights, task_loss, weighted_quality_loss
from crosslm.server.verbalizer import label_scores
from crosslm.task import TaskSpec


def add_lora(model: Any, cfg: LLMConfig) -> Any:
    from peft import LoraConfig, get_peft_model

    targets = [t for t in cfg.lora_targets if any(n.endswith(t) for n, _ in model.named_modules())]
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets or None,
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        # peft 0.21 reads transformers 5's deprecated `is_gradient_checkpointing` alias: their warning, not
        # ours, printed once per run. Only that message is silenced.
        warnings.filterwarnings(
            "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
        )
        return get_peft_model(model, lora)


@dataclass(frozen=True)
class QGItem:
    """One generated text for L_QG and L_PR: its prompt P(y), its tokens as the answer, and its weights."""

    prompt: list[int]
    answer: list[int]
    up: float  # likelihood weight
    down: float  # unlikelihood weight


TaskStep = Callable[[random.Random, Any], torch.Tensor | None]
"""(the tuning's batch RNG, its autocast context) -> L_task on one batch drawn from S+, or None (no S+)."""


def tune_adapter(
    model: Any,
    tokenizer: Any,
    task: TaskSpec,
    generated: Sequence[tuple[str, int, float]],
    good: Sequence[tuple[str, int]],
    cfg: TuneConfig,
    *,
    max_text_tokens: int,
    tau: float,
    seed: int,
    other: Sequence[float] | None = None,
) -> dict[str, float]:
    """One server update's adapter tuning. `generated` = (text, label, q); `good` = S+ as (text, label).
    `other` (the centred L_QG) = per generated text, the SLMs' highest probability of a label other than
    its own. Returns the mean of each loss term over the steps."""
    if cfg.steps == 0 or not generated:
        return {"total": 0.0, "qg": 0.0, "task": 0.0, "pr": 0.0}
    up, down = qg_weights(torch.tensor([q for _, _, q in generated], dtype=torch.float),
                          torch.tensor([y for _, y, _ in generated]),
                          torch.tensor(list(other) if other is not None else [0.0] * len(generated)),
                          form=cfg.qg_form, tau=tau, hard=cfg.hard)  # fmt: skip
    prompts = {y: user_prompt_ids(tokenizer, task.prompt_for(y)) for y in range(task.num_labels)}
    items = [
        QGItem(prompts[y], answer_ids(tokenizer, t), float(a), float(b))
        for (t, y, _), a, b in zip(generated, up, down, strict=True)
    ]
    device = precision.model_device(model)

    def task_step(rng: random.Random, amp: Any) -> torch.Tensor | None:
        if not good:
            return None
        picked = rng.sample(list(good), min(cfg.task_batch_size, len(good)))
        with amp:
            scores = label_scores(
                model, tokenizer, task, [t for t, _ in picked], max_text_tokens=max_text_tokens
            )
        return task_loss(scores, torch.tensor([y for _, y in picked], device=device))

    return tune_steps(model, tokenizer, items, cfg, seed=seed, task_step=task_step)


def tune_steps(
    model: Any, tokenizer: Any, items: Sequence[QGItem], cfg: TuneConfig, *, seed: int, task_step: TaskStep
) -> dict[str, float]:
    """S optimizer steps of the adapter on L = qg_weight * L_QG + lambda_task * L_task + alpha * L_PR, the
    loop every task kind shares: L_QG and L_PR on a batch of `items`, L_task from `task_step`. Returns the
    mean of each loss term over the steps."""
    if cfg.steps == 0 or not items:
        return {"total": 0.0, "qg": 0.0, "task": 0.0, "pr": 0.0}
    rng = random.Random(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sums = {"total": 0.0, "qg": 0.0, "task": 0.0, "pr": 0.0}
    model.train()
    micro = max(1, cfg.micro_batch_size)
    # bfloat16 autocast: the matmuls in bfloat16, the adapter, its gradients and AdamW in float32. The
    # frozen reference of L_PR runs under the same autocast, so L_PR is still exactly 0 at B = 0.
    device = precision.model_device(model)
    amp = precision.autocast(cfg.autocast, device)
    with own_rng(seed, device):  # LoRA dropout: from this update's seed alone
        for _ in progress(range(cfg.steps), desc="tune LLM", unit="step", leave=False):
            rows = rng.sample(list(items), min(cfg.batch_size, len(items)))
            n_tokens = sum(len(r.answer) for r in rows)  # L_PR is a mean over all generated-token positions
            opt.zero_grad(set_to_none=True)
            step = {"qg": 0.0, "pr": 0.0, "task": 0.0}
            # Gradient accumulation over micro-batches: the same loss and gradient, a fraction of the memory.
            for s in range(0, len(rows) if cfg.qg_weight > 0 or cfg.alpha > 0 else 0, micro):
                part = rows[s : s + micro]
                batch = pair_batch([r.prompt for r in part], [r.answer for r in part], tokenizer.pad_token_id,
                                   device)  # fmt: skip
                w_up = torch.tensor([r.up for r in part], dtype=torch.float, device=device)
                w_down = torch.tensor([r.down for r in part], dtype=torch.float, device=device)
                with amp:
                    logits = next_token_logits(model, batch).float()
                l_qg = weighted_quality_loss(gather_logprobs(logits, batch), batch.target_mask, w_up, w_down,
                                             beta=cfg.beta)  # fmt: skip
                l_qg = l_qg * (len(part) / len(rows))
                loss = cfg.qg_weight * l_qg
                if cfg.alpha > 0:
                    with torch.no_grad(), model.disable_adapter(), amp:
                        base = next_token_logits(model, batch).float()
                    l_pr = probability_regularizer(logits, base, batch.target_mask) * (
                        int(batch.target_mask.sum()) / n_tokens
                    )
                    loss = loss + cfg.alpha * l_pr
                    step["pr"] += float(l_pr.detach())
                loss.backward()
                step["qg"] += float(l_qg.detach())
            l_task = task_step(rng, amp) if cfg.lambda_task > 0 else None
            if l_task is not None:
                (cfg.lambda_task * l_task).backward()
                step["task"] = float(l_task.detach())
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step["total"] = (
                cfg.qg_weight * step["qg"] + cfg.lambda_task * step["task"] + cfg.alpha * step["pr"]
            )
            for k, v in step.items():
                sums[k] += v / cfg.steps
    model.eval()
    return sums
