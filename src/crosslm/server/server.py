"""The CrossLM server: one update = generate -> feedback -> tune the LLM -> distil the SLMs.

The server reacts to uploads as they arrive (fully asynchronous when buffer_size = 1). Each update
enhances the SLMs of the clients whose uploads triggered it and returns them as wire messages; the
runtime (in-process or Flower) decides when those messages reach their clients.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch

from crosslm.catalogue.models import load_slm_tokenizer
from crosslm.config import RunConfig
from crosslm.errors import CrossLMError, ProtocolError
from crosslm.modeling.metrics import distinct_n
from crosslm.modeling.slm import fit
from crosslm.precision import dtype_name, resolve_device, resolve_dtype
from crosslm.protocol import (
    SLMEnhanced,
    SLMUpload,
    WireMessage,
    build_model,
    decode,
    encode,
    is_slm_name,
    model_config_dict,
)
from crosslm.server.decoding import SnapshotCache
from crosslm.server.feedback import (
    ClientModel,
    Feedback,
    candidates,
    score,
    select_good,
    staleness_weights,
)
from crosslm.server.generate import generate_samples
from crosslm.server.losses import kd_targets
from crosslm.server.tune_llm import tune_adapter
from crosslm.server.verbalizer import evaluate_llm
from crosslm.task import LabelledTexts, TaskSpec

Logger = Callable[[dict[str, Any]], None]


@dataclass
class SyntheticExample:
    text: str
    label: int
    hash: str
    update: int  # the server update that generated it
    llm_version: int  # adapter version that wrote it (= updates completed before)


class CrossLMServer:
    def __init__(
        self,
        cfg: RunConfig,
        task: TaskSpec,
        llm: Any,
        tokenizer: Any,
        llm_eval_data: LabelledTexts,
        *,
        log: Logger,
        log_synthetic: Logger,
    ):
        self.cfg = cfg
        self.task = task
        self.llm = llm
        self.tokenizer = tokenizer
        self.llm_eval_data = llm_eval_data
        self.log = log
        self.log_synthetic = log_synthetic
        self.device = resolve_device(cfg.llm.device, "llm.device")
        self.snapshots = SnapshotCache()  # one merged copy of the LLM for evaluation and the next sampling
        if isinstance(llm, torch.nn.Module):  # the baselines' server has no LLM
            llm.to(self.device)
        self.models: dict[str, ClientModel] = {}
        self.pending: list[str] = []
        self.update = 0
        self.pool: list[SyntheticExample] = []
        self.seen: set[str] = set()
        self.max_bytes = int(cfg.federation.max_payload_mb * 1024 * 1024)

    # -- uploads -------------------------------------------------------------------------------------
    def receive(self, wire: WireMessage, sender: str | None = None) -> dict[str, Any]:
        """Validate an upload and record it as its client's latest SLM. Never raises on bad input:
        a rejected payload is reported in the returned event and the run goes on. `sender` is the
        identity the transport authenticated; an upload claiming another client id is refused."""
        event: dict[str, Any] = {"event": "upload", "bytes": len(wire), "accepted": False, "reason": None}
        try:
            msg = decode(
                wire,
                expected_labels=list(self.task.labels),
                max_bytes=self.max_bytes,
                expected_type="slm_upload",
            )
            assert isinstance(msg, SLMUpload)
            event.update(client=msg.client_id, round=msg.version, slm=msg.slm, train_size=msg.num_examples)
            if sender is not None and msg.client_id != sender:
                raise ProtocolError(f"upload from '{sender}' claims to be from '{msg.client_id}'")
            if msg.base_version > self.update:
                raise ProtocolError(
                    f"base_version {msg.base_version} is ahead of the server, which has made {self.update} "
                    "updates"
                )
            if not is_slm_name(msg.slm) and msg.slm not in {str(s) for s in self.cfg.clients.slms}:
                raise ProtocolError(
                    f"slm {msg.slm[:80]!r} is neither a catalogue name or Hugging Face id nor one of the "
                    "server's clients.slms"
                )
            self.models[msg.client_id] = self._host(msg)
        except (ProtocolError, CrossLMError) as e:
            event["reason"] = str(e)
            return event
        event.update(accepted=True, staleness=max(self.update - msg.base_version, 0))
        if msg.client_id not in self.pending:
            self.pending.append(msg.client_id)
        return event

    def _host(self, msg: SLMUpload) -> ClientModel:
        try:
            tokenizer = load_slm_tokenizer(msg.slm)
        except CrossLMError as e:
            raise ProtocolError(
                f"upload from {msg.client_id}: unknown SLM tokenizer '{msg.slm}' ({e})"
            ) from None
        model = build_model(msg.model_type, msg.model_config, len(self.task.labels))
        model.load_state_dict(msg.state_dict, strict=True)
        model.to(self.device).eval()
        return ClientModel(
            client_id=msg.client_id,
            slm=msg.slm,
            model=model,
            tokenizer=tokenizer,
            num_examples=msg.num_examples,
            label_counts=list(msg.label_counts),
            base_version=msg.base_version,
            round=msg.version,
        )

    def ready(self) -> bool:
        return len(self.pending) >= self.cfg.federation.buffer_size

    # -- one server update ---------------------------------------------------------------------------
    def step(self) -> list[tuple[str, WireMessage]]:
        """Run one update for the buffered uploads; returns (client_id, enhanced SLM) messages."""
        cfg = self.cfg
        t0 = time.perf_counter()
        phases: dict[str, float] = {}
        lap = _Lap(phases)
        triggers = self.pending[: cfg.federation.buffer_size]
        self.pending = self.pending[len(triggers) :]
        self.update += 1
        u = self.update
        models = list(self.models.values())
        weights = staleness_weights(models, u - 1, cfg.feedback.gamma)
        staleness = {m.client_id: max(u - 1 - m.base_version, 0) for m in models}
        if cfg.federation.server_update != "crosslm":  # the baselines' server: no LLM at all
            responses = [(cid, self._baseline_reply(cid, u)) for cid in triggers]
            lap(cfg.federation.server_update)
            self.log(
                {
                    "event": "server_update",
                    "update": u,
                    "mode": cfg.federation.server_update,
                    "trigger_clients": triggers,
                    "staleness": staleness,
                    "seconds": time.perf_counter() - t0,
                    "phase_seconds": phases,
                }
            )
            return responses

        # 3. generate
        samples, gstats = generate_samples(
            self.llm,
            self.tokenizer,
            self.task,
            cfg.generation,
            seen=self.seen,
            seed=cfg.seed * 100_003 + u,
            snapshots=self.snapshots,
        )
        self.pool += [SyntheticExample(s.text, s.label, s.hash, u, u - 1) for s in samples]
        lap("generate")

        # 4. feedback on the whole pool with the current ensemble (it improves as SLMs arrive)
        texts = [e.text for e in self.pool]
        labels = [e.label for e in self.pool]
        tau = cfg.feedback.threshold(self.task.num_labels)
        if cfg.feedback.enabled:
            fb = score(
                texts,
                labels,
                models,
                weights,
                prior_correction=cfg.feedback.prior_correction,
                batch_size=cfg.eval.batch_size,
                max_length=cfg.clients.max_length,
            )
            qualifying = candidates(labels, fb, num_labels=self.task.num_labels, tau=tau)
            missing = [c for c, p in enumerate(qualifying) if not p]
            good = select_good(
                labels,
                fb,
                num_labels=self.task.num_labels,
                tau=tau,
                max_per_label=cfg.feedback.max_per_label,
                missing_labels=cfg.feedback.missing_labels,
                min_per_label=cfg.feedback.min_per_label,
                qualifying=qualifying,
            )
        else:  # data-free KD without feedback: nothing is scored, every sample is used with its label
            fb = Feedback.unscored(len(texts), self.task.num_labels)
            good = list(range(len(texts)))
            missing = []
        lap("feedback")
        new = range(len(self.pool) - len(samples), len(self.pool))
        for i in new:
            e = self.pool[i]
            self.log_synthetic(
                {
                    "text": e.text,
                    "label": self.task.labels[e.label],
                    "q": float(fb.q[i]),
                    "slm_probs": {cid: float(p[i, e.label]) for cid, p in fb.per_client.items()},
                    "update": u,
                    "llm_version": e.llm_version,
                    "slm_versions": {m.client_id: m.round for m in models},
                    "hash": e.hash,
                }
            )

        # 5. tune the LLM adapter on this update's samples (L_QG, L_PR) and on S+ (L_task)
        losses = tune_adapter(
            self.llm,
            self.tokenizer,
            self.task,
            [(self.pool[i].text, self.pool[i].label, float(fb.q[i])) for i in new],
            [(texts[i], labels[i]) for i in good],
            cfg.tune,
            max_text_tokens=cfg.llm.max_text_tokens,
            tau=tau,
            seed=cfg.seed * 7919 + u,
        )
        lap("tune_llm")

        # 6. distil S+ into the triggering clients' SLMs and send them back
        responses = [
            (cid, self._enhance(cid, good, texts, labels, fb.ensemble_logits, u)) for cid in triggers
        ]
        lap("distill")

        if cfg.tune.steps > 0:  # an untuned LLM scores what it scored at update 0
            self.evaluate_llm(u)
        lap("evaluate_llm")
        new_q = fb.q[list(new)] if samples else torch.zeros(0)
        per_label = [sum(1 for i in good if labels[i] == c) for c in range(self.task.num_labels)]
        self.log(
            {
                "event": "server_update",
                "update": u,
                "trigger_clients": triggers,
                "weights": weights,
                "staleness": staleness,
                "generated": gstats.generated,
                "kept": gstats.kept,
                "gen_tokens_per_s": gstats.tokens_per_s,
                "gen_dtype": gstats.dtype,
                "distinct2": distinct_n([s.text for s in samples], 2),
                "mean_q": float(new_q.mean()) if len(new_q) else float("nan"),
                "tau": tau,
                "share_q_ge_tau": float((new_q >= tau).float().mean()) if len(new_q) else float("nan"),
                "pool_size": len(self.pool),
                "splus_size": len(good),
                "splus_per_label": per_label,
                "labels_without_candidates": [self.task.labels[c] for c in missing],
                "loss": losses,
                "seconds": time.perf_counter() - t0,
                "phase_seconds": phases,
            }
        )
        return responses

    def _enhance(
        self, cid: str, good: list[int], texts: list[str], labels: list[int], ens_logits: torch.Tensor, u: int
    ) -> WireMessage:
        """Distil S+ into a copy of client cid's latest SLM; the registry keeps the uploaded version."""
        m = self.models[cid]
        student = copy.deepcopy(m.model)
        if good:
            d = self.cfg.distill
            targets = kd_targets(
                torch.tensor([labels[i] for i in good]), ens_logits[good], mu=d.mu, temperature=d.temperature
            )
            fit(
                student,
                m.tokenizer,
                [texts[i] for i in good],
                targets,
                epochs=d.epochs,
                lr=d.lr,
                batch_size=d.batch_size,
                max_length=self.cfg.clients.max_length,
                seed=self.cfg.seed * 31 + u,
                desc=f"distil {cid}",
                autocast=d.autocast,
            )
        return self._reply(cid, student, student.state_dict(), u)

    def _baseline_reply(self, cid: str, u: int) -> WireMessage:
        """'none': the client's own SLM back (standalone); 'fedavg': the example-weighted average of the
        latest SLMs of every client that shares its architecture (model type and config)."""
        m = self.models[cid]
        state = m.model.state_dict()
        if self.cfg.federation.server_update == "fedavg":
            group = fedavg_group(m, list(self.models.values()))
            state = fedavg_state([g.model.state_dict() for g in group], [g.num_examples for g in group])
            self.log({"event": "fedavg", "update": u, "client": cid, "group": [g.client_id for g in group]})
        return self._reply(cid, m.model, state, u)

    def _reply(self, cid: str, model: Any, state: dict[str, torch.Tensor], u: int) -> WireMessage:
        """Client cid's SLM (architecture of `model`, weights `state`) as this update's enhanced message."""
        return encode(
            SLMEnhanced(
                client_id=cid,
                slm=self.models[cid].slm,
                model_type=model.config.model_type,
                model_config=model_config_dict(model),
                labels=list(self.task.labels),
                server_update=u,
                state_dict=state,
            ),
            dtype=self.cfg.clients.upload_dtype,
        )

    def evaluate_llm(self, update: int) -> dict[str, Any]:
        """Raw and calibrated accuracy with the task's label words; at update 0 (the zero-shot baseline)
        other label-word forms are tried too, so the baseline gets its best form."""
        kw = {"max_text_tokens": self.cfg.llm.max_text_tokens, "batch_size": self.cfg.eval.batch_size}
        forms = {}
        if update == 0:
            for name, words in (("lowercase", [v.lower() for v in self.task.verbalizer]),
                                ("uppercase", [v.upper() for v in self.task.verbalizer])):  # fmt: skip
                if tuple(words) != self.task.verbalizer and len(set(words)) == len(words):
                    forms[name] = words
        dtype = resolve_dtype(self.cfg.eval.llm_dtype, self.device)
        model = self.snapshots.get(self.llm, dtype)  # the adapter merged in: the same function, less work
        metrics = evaluate_llm(
            model, self.tokenizer, self.task, self.llm_eval_data, other_verbalizers=forms, **kw
        )
        event = {"event": "llm_eval", "update": update, "dtype": dtype_name(dtype), **metrics}
        self.log(event)
        return event

    def save_adapter(self, path: Path) -> None:
        """peft `save_pretrained`; `PeftModel.from_pretrained(base, path)` loads it back."""
        from crosslm.io import atomic_dir

        atomic_dir(path, lambda tmp: self.llm.save_pretrained(tmp))

    def load_adapter(self, path: Path) -> None:
        """Load adapter weights written by `save_adapter` into this server's LLM (a resumed run)."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        result = set_peft_model_state_dict(self.llm, load_file(str(Path(path) / "adapter_model.safetensors")))
        missing = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
        if missing:
            raise CrossLMError(f"adapter in '{path}' does not match this LLM (unexpected {missing[0]})")


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


class _Lap:
    """Records the seconds since the previous lap under a phase name."""

    def __init__(self, into: dict[str, float]):
        self.into = into
        self.last = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.into[name] = round(now - self.last, 2)
        self.last = now
