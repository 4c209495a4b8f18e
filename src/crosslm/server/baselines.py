"""The baselines' server updates, beside CrossLM's (update.py): no LLM is loaded or used.

echo_update    standalone: each triggering client gets its own SLM back (its matched extra local epochs
               run on the client, see `clients.extra_local_epochs`)
fedavg_update  asynchronous FedAvg: each triggering client gets the example-weighted average of the latest
               SLMs of every client that shares its architecture
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, cast

import torch

from crosslm.protocol import WireMessage, model_config_dict
from crosslm.server.feedback import ClientModel
from crosslm.server.update import PhaseTimer, staleness

if TYPE_CHECKING:
    from crosslm.server.server import CrossLMServer


def echo_update(server: CrossLMServer, triggers: list[str], u: int) -> list[tuple[str, WireMessage]]:
    timer = PhaseTimer()
    responses = []
    for cid in triggers:
        m = server.models[cid]
        responses.append((cid, server.reply(cid, m.model, m.model.state_dict(), u)))
    timer("none")
    server.log(_event(server, u, triggers, "none", timer))
    return responses


def fedavg_update(server: CrossLMServer, triggers: list[str], u: int) -> list[tuple[str, WireMessage]]:
    timer = PhaseTimer()
    responses = []
    for cid in triggers:
        m = server.models[cid]
        group = fedavg_group(m, list(server.models.values()))
        state = fedavg_state([g.model.state_dict() for g in group], [g.num_examples for g in group])
        server.log({"event": "fedavg", "update": u, "client": cid, "group": [g.client_id for g in group]})
        responses.append((cid, server.reply(cid, m.model, state, u)))
    timer("fedavg")
    server.log(_event(server, u, triggers, "fedavg", timer))
    return responses


def _event(server: CrossLMServer, u: int, triggers: list[str], mode: str, timer: PhaseTimer) -> dict:
    return {"event": "server_update", "update": u, "mode": mode, "trigger_clients": triggers,
            "staleness": staleness(server, u), "seconds": timer.seconds, "phase_seconds": timer.phases}  # fmt: skip


def fedavg_group(target: ClientModel, models: list[ClientModel]) -> list[ClientModel]:
    """The clients FedAvg may average with `target`: the same architecture, exactly (type and config)."""
    key = (target.model.config.model_type, json.dumps(model_config_dict(target.model), sort_keys=True))
    return [
        m
        for m in models
        if (m.model.config.model_type, json.dumps(model_config_dict(m.model), sort_keys=True)) == key
    ]


def fedavg_state(states: list[dict[str, torch.Tensor]], weights: list[int]) -> dict[str, torch.Tensor]:
    """sum_j n_j * theta_j / sum_j n_j, tensor by tensor (integer buffers are taken from the first)."""
    total = float(sum(weights))
    out = {}
    for k, v in states[0].items():
        if v.is_floating_point():
            mean = sum(s[k].float() * (w / total) for s, w in zip(states, weights, strict=True))
            out[k] = cast(torch.Tensor, mean).to(v.dtype)
        else:
            out[k] = v.clone()
    return out
