"""The CrossLM objective, in one place (symbols as in docs/algorithm.md).

    L = L_QG + lambda_task * L_task + alpha * L_PR

L_QG   quality-guided generation loss: samples the SLM ensemble rates well (q near 1) become more likely,
       poor ones (q near 0) less likely through a bounded unlikelihood term. The centred form raises only
       the texts above their label's mean q and pushes down only texts the SLMs read as another label.
L_task the LLM as a classifier through a verbalizer, trained on the class-balanced good set S+.
L_PR   probability regularisation: KL(p_theta0 || p_theta) per token position keeps the tuned LLM close
       to its original distribution, so its general ability survives.
KD     the SLMs' distillation target mixes the intended label with the ensemble's soft labels.
"""

from __future__ import annotations

import torch


def sequence_terms(token_logp: torch.Tensor, target_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: l = mean_t log p(x_t|ctx) and u = -mean_t log(1 - p(x_t|ctx)) over generated tokens only."""
    m = target_mask.float()
    n = m.sum(-1).clamp(min=1.0)
    l_seq = (token_logp * m).sum(-1) / n
    # log(1 - p) computed stably from log p; p is clamped below 1 so u stays finite (bounded push-down).
    p = token_logp.exp().clamp(max=1.0 - 1e-6)
    u_seq = -(torch.log1p(-p) * m).sum(-1) / n
    return l_seq, u_seq


def quality_guided_loss(
    token_logp: torch.Tensor,
    target_mask: torch.Tensor,
    q: torch.Tensor,
    *,
    beta: float,
    hard: bool = False,
    tau: float = 0.5,
) -> torch.Tensor:
    """L_QG = mean_(x,y) [ -q * l(x|y) + beta * (1-q) * u(x|y) ]; hard variant uses q := 1[q >= tau]."""
    weight = (q >= tau).float() if hard else q
    return weighted_quality_loss(token_logp, target_mask, weight, 1.0 - weight, beta=beta)


def weighted_quality_loss(
    token_logp: torch.Tensor, target_mask: torch.Tensor, up: torch.Tensor, down: torch.Tensor, *, beta: float
) -> torch.Tensor:
    """mean_(x,y) [ -up * l(x|y) + beta * down * u(x|y) ]: L_QG with any per-text weights."""
    l_seq, u_seq = sequence_terms(token_logp, target_mask)
    return (-up * l_seq + beta * down * u_seq).mean()


def qg_weights(
    q: torch.Tensor, labels: torch.Tensor, other: torch.Tensor, *, form: str, tau: float, hard: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per generated text, L_QG's likelihood weight `up` and unlikelihood weight `down`.

    form 'q':       up = q (1[q >= tau] when hard), down = 1 - up.
    form 'centred': up = max(q - mean q of the text's label, 0), computed over the update's texts; down = 1
                    only when the SLMs are confident the text is of another label (`other`, their highest
                    probability of another label, is >= tau and above q), else 0."""
    if form == "q":
        up = (q >= tau).float() if hard else q
        return up, 1.0 - up
    up = torch.zeros_like(q)
    for c in labels.unique():
        mine = labels == c
        up[mine] = (q[mine] - q[mine].mean()).clamp(min=0.0)
    return up, ((other >= tau) & (other > q)).float()


def probability_regularizer(
    logits: torch.Tensor, base_logits: torch.Tensor, position_mask: torch.Tensor
) -> torch.Tensor:
    """L_PR = mean over valid positions of KL(p_theta0(.|ctx) || p_theta(.|ctx))."""
    logp = torch.log_softmax(logits, dim=-1)
    logp0 = torch.log_softmax(base_logits.detach(), dim=-1)
    kl = (logp0.exp() * (logp0 - logp)).sum(-1)
    m = position_mask.float()
    return (kl * m).sum() / m.sum().clamp(min=1.0)


def task_loss(label_scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy restricted to the C label strings; label_scores[i, c] = log p(verbalizer_c | prompt(x_i))."""
    return torch.nn.functional.cross_entropy(label_scores, labels)


def kd_targets(
    labels: torch.Tensor, ensemble_logits: torch.Tensor, *, mu: float, temperature: float
) -> torch.Tensor:
    """(1 - mu) * onehot(y) + mu * softmax(ensemble_logits / T): each row is a distribution over labels."""
    onehot = torch.nn.functional.one_hot(labels, ensemble_logits.shape[-1]).float()
    soft = torch.softmax(ensemble_logits / temperature, dim=-1)
    return (1.0 - mu) * onehot + mu * soft
