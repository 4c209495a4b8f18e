"""The server: hosts the clients' SLMs, the synthetic pool and the LLM, and runs the method's update.

The server reacts to uploads as they arrive (fully asynchronous when buffer_size = 1). Each update
(update.py for CrossLM, baselines.py for the baselines) enhances the SLMs of the clients whose uploads
triggered it and returns them as wire messages; the runtime (in-process or Flower) decides when those
messages reach their clients.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from crosslm.catalogue.models import SLM_KIND, load_slm_tokenizer
from crosslm.config import RunConfig
from crosslm.errors import CrossLMError, ProtocolError
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
    wire_state,
)
from crosslm.server.baselines import echo_update, fedavg_update
from crosslm.server.decoding import SnapshotCache
from crosslm.server.feedback import ClientModel
from crosslm.server.generation_update import SyntheticPair, crosslm_generation_update, evaluate_llm_generation
from crosslm.server.update import SyntheticExample, crosslm_update
from crosslm.server.verbalizer import evaluate_llm
from crosslm.task import GenerationPairs, LabelledTexts, TaskSpec

Logger = Callable[[dict[str, Any]], None]
# federation.server_update -> the update it runs (CrossLM's depends on the task kind; the baselines' do not)
UPDATES = {"crosslm": crosslm_update, "none": echo_update, "fedavg": fedavg_update}
GENERATION_UPDATES = {**UPDATES, "crosslm": crosslm_generation_update}


class CrossLMServer:
    def __init__(
        self,
        cfg: RunConfig,
        task: TaskSpec,
        llm: Any,
        tokenizer: Any,
        llm_eval_data: LabelledTexts | GenerationPairs,
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
        self.pool: list[SyntheticExample] = []  # a classification task's synthetic texts
        self.pairs: list[SyntheticPair] = []  # a generation task's synthetic (input, target) pairs
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
                kind=self.task.kind,
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
            tokenizer = load_slm_tokenizer(msg.slm, SLM_KIND[self.task.kind])
        except CrossLMError as e:
            raise ProtocolError(
                f"upload from {msg.client_id}: unknown SLM tokenizer '{msg.slm}' ({e})"
            ) from None
        model = build_model(msg.model_type, msg.model_config, len(self.task.labels), kind=self.task.kind)
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
        """Run one update for the buffered uploads with the method's update (CrossLM's, or a baseline's);
        returns (client_id, enhanced SLM) messages."""
        triggers = self.pending[: self.cfg.federation.buffer_size]
        self.pending = self.pending[len(triggers) :]
        self.update += 1
        updates = GENERATION_UPDATES if self.task.kind == "generation" else UPDATES
        return updates[self.cfg.federation.server_update](self, triggers, self.update)

    def reply(self, cid: str, model: Any, state: dict[str, torch.Tensor], u: int) -> WireMessage:
        """Client cid's SLM (architecture of `model`, weights `state`) as this update's enhanced message."""
        return encode(
            SLMEnhanced(
                client_id=cid,
                slm=self.models[cid].slm,
                model_type=model.config.model_type,
                model_config=model_config_dict(model),
                labels=list(self.task.labels),
                server_update=u,
                state_dict=wire_state(model, state),
            ),
            dtype=self.cfg.clients.upload_dtype,
        )

    def eval_model(self) -> Any:
        """The LLM with its adapter merged in, in eval.llm_dtype: the same function as the peft model, less
        work. Cached until the adapter changes; every classification pass of the server uses it."""
        return self.snapshots.get(self.llm, resolve_dtype(self.cfg.eval.llm_dtype, self.device))

    def evaluate_llm(self, update: int) -> dict[str, Any]:
        """Raw and calibrated accuracy with the task's label words; at update 0 (the zero-shot baseline)
        other label-word forms are tried too, so the baseline gets its best form. A generation task's LLM
        is measured as a target writer instead (ROUGE-L, target perplexity)."""
        if self.task.kind == "generation":
            return evaluate_llm_generation(self, update)
        assert isinstance(self.llm_eval_data, LabelledTexts)
        kw = {"max_text_tokens": self.cfg.llm.max_text_tokens, "batch_size": self.cfg.eval.batch_size}
        forms = {}
        if update == 0:
            for name, words in (("lowercase", [v.lower() for v in self.task.verbalizer]),
                                ("uppercase", [v.upper() for v in self.task.verbalizer])):  # fmt: skip
                if tuple(words) != self.task.verbalizer and len(set(words)) == len(words):
                    forms[name] = words
        dtype = resolve_dtype(self.cfg.eval.llm_dtype, self.device)
        metrics = evaluate_llm(
            self.eval_model(), self.tokenizer, self.task, self.llm_eval_data, other_verbalizers=forms, **kw
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
