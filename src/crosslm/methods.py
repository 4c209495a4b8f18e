"""The methods an experiment compares, each a preset of config keys over the same main job.

`crosslm.config.apply_method` sets a preset's keys on a config. A preset only sets the keys that define the method; everything else (data, models, budgets) stays as
configured, so every method gets the same clients, the same local training and the same compute budget.

crosslm          the full method: L_QG + lambda_task * L_task + alpha * L_PR, feedback-filtered S+, KD
crosslm-no-qg    ablation: no L_QG (the LLM is tuned by L_task and L_PR only)
crosslm-no-pr    ablation: no L_PR (alpha = 0)
kd-no-feedback   data-free KD: the untuned LLM generates, no SLM scoring, no filtering, SLMs distilled on
                 every synthetic sample with its intended label
fedavg           asynchronous FedAvg of SLMs, only among clients that share an architecture
standalone       local training only; each server reply is replaced by `distill.epochs` extra local epochs,
                 so a standalone client gets the same schedule and as many training epochs as under CrossLM
centralized      one SLM trained on the union of all clients' training data (an upper bound that no
                 federated method may see; see crosslm.run.run_centralized)
"""

from __future__ import annotations

from typing import Any

METHODS: dict[str, dict[str, Any]] = {
    "crosslm": {},
    "crosslm-no-qg": {"tune.qg_weight": 0.0},
    "crosslm-no-pr": {"tune.alpha": 0.0},
    "kd-no-feedback": {"feedback.enabled": False, "tune.steps": 0, "distill.mu": 0.0},
    "fedavg": {"federation.server_update": "fedavg"},
    "standalone": {"federation.server_update": "none", "clients.extra_local_epochs": "distill.epochs"},
    "centralized": {},
}

METHOD_NAMES = tuple(METHODS)

# Methods whose server never touches the LLM: it is not loaded, and their LLM row is the zero-shot one.
WITHOUT_LLM = frozenset({"fedavg", "standalone", "centralized"})

# Config keys (dotted prefixes) a method's runs never read: a change there leaves its finished experiment
# cells valid, so the experiment runner's drift check skips them. (standalone's epochs follow
# distill.epochs through clients.extra_local_epochs, which is checked. data.generation_prompt and
# data.label_descriptions only shape the LLM's generation prompts.)
_SERVER_LLM_KEYS = (
    "llm.",
    "generation.",
    "feedback.",
    "tune.",
    "distill.",
    "data.generation_prompt",
    "data.label_descriptions",
)
UNREAD_KEYS: dict[str, tuple[str, ...]] = {
    "kd-no-feedback": ("feedback.",),  # nothing is scored or filtered
    **{m: _SERVER_LLM_KEYS for m in sorted(WITHOUT_LLM)},
    "centralized": (*_SERVER_LLM_KEYS, "clients.logit_adjust"),  # one SLM on the union: plain cross-entropy
}
