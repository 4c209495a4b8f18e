"""A CrossLM client: trains its own SLM on private data, uploads weights, adopts enhanced weights.

Only the SLM's weights and declared metadata leave the client (see protocol.messages); texts, labels and
per-example outputs never do. The global test split is an evaluation-only artefact of the simulation.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from crosslm.catalogue.models import load_slm
from crosslm.config import ClientConfig
from crosslm.errors import CrossLMError
from crosslm.io import atomic_dir, atomic_write_json
from crosslm.modeling.slm import evaluate, train_supervised
from crosslm.partition import stratified_holdout
from crosslm.precision import resolve_device
from crosslm.protocol import SLMEnhanced, SLMUpload, WireMessage, decode, encode, model_config_dict
from crosslm.seeding import pass_seed
from crosslm.task import LabelledTexts, TaskSpec

STATE_FILE = "crosslm_client.json"


@dataclass
class ClientData:
    train: LabelledTexts
    test: LabelledTexts
    global_test: LabelledTexts
    validation: LabelledTexts = field(default_factory=LabelledTexts)
    """Held out of the client's training data: decides whether an enhanced SLM is adopted."""


class Client:
    def __init__(
        self,
        client_id: str,
        slm: str,
        task: TaskSpec,
        data: ClientData,
        cfg: ClientConfig,
        *,
        eval_batch_size: int,
        max_payload_bytes: int,
        seed: int,
    ):
        self.client_id = client_id
        self.slm = slm
        self.task = task
        if cfg.validation_fraction > 0 and not len(data.validation):
            train, held = stratified_holdout(
                data.train, task.num_labels, cfg.validation_fraction, pass_seed(seed, "validation", 0)
            )
            data = replace(data, train=train, validation=held)
        self.data = data
        self.cfg = cfg
        self.seed = seed
        self.eval_batch_size = eval_batch_size
        self.max_payload_bytes = max_payload_bytes
        self.model, self.tokenizer = load_slm(slm, list(task.labels))
        self.model.to(resolve_device(cfg.device, "clients.device"))
        self.round = 0
        self.base_version = 0  # server update the current weights came from; 0 = pretrained
        self.metrics: dict[str, dict[str, float]] = {}  # of the current weights (unchanged since upload)

    def evaluate(self) -> dict[str, dict[str, float]]:
        """Metrics of the current weights on the client's test split, the global test split (a
        simulation-only split; a real deployment may have none) and its held-out validation part."""
        splits = {
            "local": self.data.test,
            "global": self.data.global_test,
            "validation": self.data.validation,
        }
        return {name: self._score(data) for name, data in splits.items() if name == "local" or len(data)}

    def _score(self, data: LabelledTexts) -> dict[str, float]:
        kw = {"batch_size": self.eval_batch_size, "max_length": self.cfg.max_length}
        return evaluate(self.model, self.tokenizer, data, self.task.num_labels, **kw)

    def _train_private(self, epochs: int, seed: int, desc: str) -> float:
        """Supervised training on the client's private data with its local settings."""
        return train_supervised(
            self.model,
            self.tokenizer,
            self.data.train,
            self.task.num_labels,
            epochs=epochs,
            lr=self.cfg.lr,
            batch_size=self.cfg.batch_size,
            max_length=self.cfg.max_length,
            seed=seed,
            autocast=self.cfg.autocast,
            logit_adjust=self.cfg.logit_adjust,
            desc=desc,
        )

    def local_round(self) -> tuple[WireMessage, dict[str, Any]]:
        """Train E epochs on private data from the current weights, evaluate, and build the upload."""
        self.round += 1
        t0 = time.perf_counter()
        loss = self._train_private(
            self.cfg.epochs,
            pass_seed(self.seed, "local_round", self.round),
            f"{self.client_id} local round {self.round}",
        )
        metrics = self.metrics = self.evaluate()
        upload = SLMUpload(
            client_id=self.client_id,
            slm=self.slm,
            model_type=self.model.config.model_type,
            model_config=model_config_dict(self.model),
            labels=list(self.task.labels),
            num_examples=len(self.data.train),
            label_counts=self.data.train.label_counts(self.task.num_labels),
            version=self.round,
            base_version=self.base_version,
            metrics=dict(metrics["local"]),
            state_dict=self.model.state_dict(),
        )
        event = {
            "event": "client_trained",
            "client": self.client_id,
            "round": self.round,
            "base_version": self.base_version,
            "train_loss": loss,
            **metrics,
            "seconds": time.perf_counter() - t0,
        }
        return encode(upload, dtype=self.cfg.upload_dtype), event

    def receive_enhanced(self, wire: WireMessage) -> dict[str, Any]:
        """Validate the server's enhanced SLM and adopt it unless it is worse on the client's held-out
        validation part than the model the client has (macro-F1 below it by more than the tolerance):
        then the client keeps its own weights and reports the refusal (`adopted` 0). Test accuracy is
        recorded before and after."""
        msg = decode(
            wire,
            expected_labels=list(self.task.labels),
            max_bytes=self.max_payload_bytes,
            expected_type="slm_enhanced",
        )
        assert isinstance(msg, SLMEnhanced)
        before = self.metrics or self.evaluate()
        own = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.model.load_state_dict(msg.state_dict, strict=True)
        offered: dict[str, dict[str, float]] = {}
        adopted = True
        if len(self.data.validation) and "validation" in before:
            offered = {"validation": self._score(self.data.validation)}
            floor = before["validation"]["macro_f1"] - self.cfg.accept_tolerance
            adopted = offered["validation"]["macro_f1"] >= floor - 1e-9
        if adopted:
            self.base_version = msg.server_update
        else:
            if len(self.data.global_test):  # simulation only: what the refusal cost on the global split
                offered["global"] = self._score(self.data.global_test)
            self.model.load_state_dict(own, strict=True)
        if self.cfg.extra_local_epochs > 0:  # standalone baseline: the server's effort, spent locally
            self._train_private(
                self.cfg.extra_local_epochs,
                pass_seed(self.seed, "extra_epochs", self.round),
                f"{self.client_id} extra local epochs",
            )
        after = self.metrics = self.evaluate()
        return {
            "event": "enhanced",
            "client": self.client_id,
            "update": msg.server_update,
            "adopted": int(adopted),
            "before": before,
            **({"offered": offered} if offered else {}),
            "after": after,
        }

    def save(self, path: Path) -> None:
        """`AutoModelForSequenceClassification.from_pretrained(path)` loads it back; `restore` reloads the
        client's own state too (round, base version, metrics), which a Flower node needs between messages."""

        def write(tmp: Path) -> None:
            self.model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            state = {
                "client_id": self.client_id,
                "slm": self.slm,
                "labels": list(self.task.labels),
                "round": self.round,
                "base_version": self.base_version,
                "metrics": self.metrics,
            }
            atomic_write_json(tmp / STATE_FILE, state)

        atomic_dir(path, write)

    def restore(self, path: Path) -> bool:
        """Load weights and state saved by `save`; False when `path` holds no saved client yet."""
        path = Path(path)
        if not (path / STATE_FILE).is_file():
            return False
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        if state.get("labels") != list(self.task.labels) or state.get("slm") != self.slm:
            raise CrossLMError(
                f"'{path}' holds a client for SLM {state.get('slm')!r} and labels {state.get('labels')}, "
                f"not {self.slm!r} and {list(self.task.labels)}; use a fresh work-dir for a new task"
            )
        self.model.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
        self.round = int(state["round"])
        self.base_version = int(state["base_version"])
        self.metrics = state.get("metrics") or {}
        return True
