"""A CrossLM client: trains its own SLM on private data, uploads weights, adopts enhanced weights.

`ClientBase` is the part every task kind shares: the held-out validation part, the local round and its
upload, the acceptance rule, saving and restoring. `Client` is a classification task's client (a sequence
classifier on labelled texts); crosslm.client.generation_client holds a generation task's (a causal LM on
input -> target pairs).

Only the SLM's weights and declared metadata leave the client (see protocol.messages); texts, labels and
per-example outputs never do. The global test split is an evaluation-only artefact of the simulation.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
from safetensors.torch import load_file, save_file

from crosslm.catalogue.models import load_slm
from crosslm.config import ClientConfig
from crosslm.errors import CrossLMError
from crosslm.io import atomic_dir, atomic_write_json
from crosslm.modeling.metrics import classification_metrics, macro_f1
from crosslm.modeling.slm import evaluate, predict_logits, train_supervised
from crosslm.partition import stratified_holdout
from crosslm.precision import resolve_device
from crosslm.protocol import (
    SLMEnhanced,
    SLMUpload,
    WireMessage,
    decode,
    encode,
    model_config_dict,
    wire_state,
)
from crosslm.seeding import pass_seed
from crosslm.task import GenerationPairs, LabelledTexts, TaskSpec

STATE_FILE = "crosslm_client.json"
KEEP_FILE = "keep_targets.safetensors"


D = TypeVar("D", LabelledTexts, GenerationPairs)


def tied_names(model: torch.nn.Module) -> set[str]:
    """Names of parameters that share their tensor with another name (e.g. a tied LM head)."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return {n for group in names.values() if len(group) > 1 for n in group}


@dataclass
class ClientData(Generic[D]):
    train: D
    test: D
    global_test: D
    validation: D | None = None
    """Held out of the client's own texts (clients.validation_source), never trained on: decides whether an
    enhanced SLM is adopted (None: none)."""

    @property
    def held_out(self) -> D:
        """The validation part, empty when there is none."""
        return self.validation if self.validation is not None else self.train.subset([])


def hold_out(data: ClientData[D], num_labels: int, fraction: float, source: str, seed: int) -> ClientData[D]:
    """The client's data with a stratified `fraction` of its `source` split ('test' or 'train') moved to
    the validation part. Taking it from the evaluation texts leaves every training text to training: on
    trec, holding out a tenth of 150 training texts cost the SLMs about 4 points over three seeds. Both
    parts of a split keep at least one text (else nothing is held out)."""
    split = data.test if source == "test" else data.train
    kept, held = stratified_holdout(split, num_labels, fraction, seed)
    if not len(kept) or not len(held):
        return data
    return (
        replace(data, test=kept, validation=held)
        if source == "test"
        else replace(data, train=kept, validation=held)
    )


def worse_share(
    labels: list[int],
    own: list[int],
    offered: list[int],
    num_labels: int,
    *,
    tolerance: float,
    draws: int = 500,
    seed: int = 0,
) -> float:
    """The share of bootstrap draws of the held-out texts (both models scored on the same draw) on which
    the offered model's macro-F1 is below the own model's minus `tolerance`: how sure the client can be
    that a reply is worse, given how few texts it holds out."""
    gen = torch.Generator().manual_seed(seed)
    y, a, b = torch.tensor(labels), torch.tensor(own), torch.tensor(offered)
    worse = 0
    for _ in range(draws):
        i = torch.randint(len(y), (len(y),), generator=gen)
        yi = y[i].tolist()
        worse += macro_f1(yi, b[i].tolist(), num_labels) < macro_f1(yi, a[i].tolist(), num_labels) - tolerance
    return worse / draws


class ClientBase(Generic[D]):
    """What every client does, whatever its task kind; the subclass says how its SLM is loaded, trained,
    scored and judged on the held-out part (the methods that raise NotImplementedError)."""

    metric = "macro_f1"
    """The held-out metric the point acceptance rule compares (higher is better)."""

    def __init__(
        self,
        client_id: str,
        slm: str,
        task: TaskSpec,
        data: ClientData[D],
        cfg: ClientConfig,
        *,
        eval_batch_size: int,
        max_payload_bytes: int,
        seed: int,
    ):
        self.client_id = client_id
        self.slm = slm
        self.task = task
        if cfg.validation_fraction > 0 and not len(data.held_out):
            data = hold_out(
                data,
                task.num_labels,
                cfg.validation_fraction,
                cfg.validation_source,
                pass_seed(seed, "validation", 0),
            )
        self.data: ClientData[D] = data
        self.cfg = cfg
        self.seed = seed
        self.eval_batch_size = eval_batch_size
        self.max_payload_bytes = max_payload_bytes
        self.model, self.tokenizer = self._load_model()
        self.model.to(resolve_device(cfg.device, "clients.device"))
        self.round = 0
        self.base_version = 0  # server update the current weights came from; 0 = pretrained
        self.metrics: dict[str, dict[str, float]] = {}  # of the current weights (unchanged since upload)
        self.keep_targets: torch.Tensor | None = None
        """[N, C] the last adopted model's predictions on the training texts (clients.keep_weight)."""
        self.changed_since_round = False
        """The weights changed after the last local round (an adopted reply, extra epochs): what
        clients.final_round adapts to the client's own data before the run ends."""

    # -- what a task kind supplies ---------------------------------------------------------------------
    def _load_model(self) -> tuple[Any, Any]:
        raise NotImplementedError

    def _score(self, data: D) -> dict[str, float]:
        """The current model's metrics on `data`."""
        raise NotImplementedError

    def _predict(self, data: D) -> list[Any]:
        """The current model's outputs on `data` (what the acceptance rule compares)."""
        raise NotImplementedError

    def _held_out_metrics(self, outputs: list[Any]) -> dict[str, float]:
        """The validation metrics of the model whose outputs on the held-out part these are."""
        raise NotImplementedError

    def _worse_share(self, own: list[Any], offered: list[Any], update: int) -> float:
        """The share of bootstrap draws of the held-out part on which `offered` is worse than `own` by
        more than the tolerance."""
        raise NotImplementedError

    @property
    def tolerance(self) -> float:
        raise NotImplementedError

    def _remember_adopted(self) -> None:
        """Called after a reply is adopted (clients.keep_weight)."""

    def _train_private(self, epochs: int, seed: int, desc: str) -> float:
        """Training on the client's private data with its local settings; returns the last loss."""
        raise NotImplementedError

    # -- what every client does ------------------------------------------------------------------------
    def evaluate(self) -> dict[str, dict[str, float]]:
        """Metrics of the current weights on the client's test split, the global test split (a
        simulation-only split; a real deployment may have none) and its held-out validation part."""
        splits = {
            "local": self.data.test,
            "global": self.data.global_test,
            "validation": self.data.held_out,
        }
        return {name: self._score(data) for name, data in splits.items() if name == "local" or len(data)}

    def local_round(self) -> tuple[WireMessage, dict[str, Any]]:
        """Train E epochs on private data from the current weights, evaluate, and build the upload."""
        self.round += 1
        self.changed_since_round = False
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
            state_dict=wire_state(self.model),
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
        validation part than the model the client has: its metric (`metric`) below the own model's by
        more than the tolerance in a share clients.accept_confidence of bootstrap draws of that part (or
        as measured, with confidence 0). Then the client keeps its own weights and reports the refusal
        (`adopted` 0). Test metrics are recorded before and after."""
        msg = decode(
            wire,
            expected_labels=list(self.task.labels),
            max_bytes=self.max_payload_bytes,
            expected_type="slm_enhanced",
            kind=self.task.kind,
        )
        assert isinstance(msg, SLMEnhanced)
        before = self.metrics or self.evaluate()
        own = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        judged = len(self.data.held_out) > 0 and "validation" in before
        own_out = self._predict(self.data.held_out) if judged else []
        self.model.load_state_dict(msg.state_dict, strict=True)
        offered: dict[str, dict[str, float]] = {}
        adopted = True
        share = None
        if judged:
            offered_out = self._predict(self.data.held_out)  # one pass: the metrics and the bootstrap
            offered = {"validation": self._held_out_metrics(offered_out)}
            share = self._worse_share(own_out, offered_out, msg.server_update)
            if self.cfg.accept_confidence > 0:
                adopted = share < self.cfg.accept_confidence
            else:
                floor = before["validation"][self.metric] - self.tolerance
                adopted = offered["validation"][self.metric] >= floor - 1e-9
        if adopted:
            self.base_version = msg.server_update
            self._remember_adopted()  # later local rounds keep close to what the reply taught
        else:
            offered["local"] = self._score(self.data.test)  # the refusal checked on more of its own texts
            if len(self.data.global_test):  # simulation only: what the refusal cost on the global split
                offered["global"] = self._score(self.data.global_test)
            self.model.load_state_dict(own, strict=True)
        if self.cfg.extra_local_epochs > 0:  # standalone baseline: the server's effort, spent locally
            self._train_private(
                self.cfg.extra_local_epochs,
                pass_seed(self.seed, "extra_epochs", self.round),
                f"{self.client_id} extra local epochs",
            )
        changed = adopted or self.cfg.extra_local_epochs > 0  # else the own weights are back, as measured
        self.changed_since_round = self.changed_since_round or changed
        after = self.metrics = self.evaluate() if changed else before
        return {
            "event": "enhanced",
            "client": self.client_id,
            "update": msg.server_update,
            "adopted": int(adopted),
            **({"worse_share": share} if share is not None else {}),
            "before": before,
            **({"offered": offered} if offered else {}),
            "after": after,
        }

    def finish(self) -> dict[str, Any]:
        """End the run: with clients.final_round, a client whose weights changed since its last local round
        trains one more (not uploaded), so it keeps what its last reply taught adapted to its own data (a
        reply distilled on synthetic texts alone lowers a client its private data had lifted); then the
        `client_eval` report of the weights it ends with (`final_epochs`: the epochs that last round took)."""
        epochs = self.cfg.epochs if self.cfg.final_round and self.changed_since_round else 0
        if epochs:
            self._train_private(
                epochs, pass_seed(self.seed, "final_round", self.round), f"{self.client_id} final local round"
            )
            self.changed_since_round = False
            self.metrics = self.evaluate()
        return {
            "event": "client_eval",
            "client": self.client_id,
            "round": self.round,
            "base_version": self.base_version,
            "final_epochs": epochs,
            **(self.metrics or self.evaluate()),
        }

    def save(self, path: Path) -> None:
        """`AutoModelForSequenceClassification.from_pretrained(path)` (AutoModelForCausalLM for a generation
        task) loads it back; `restore` reloads the client's own state too (round, base version, metrics),
        which a Flower node needs between messages."""

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
                "changed_since_round": self.changed_since_round,
            }
            atomic_write_json(tmp / STATE_FILE, state)
            if self.keep_targets is not None:
                save_file({"keep_targets": self.keep_targets.contiguous()}, str(tmp / KEEP_FILE))

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
        missing, unexpected = self.model.load_state_dict(
            load_file(str(path / "model.safetensors")), strict=False
        )
        untied = sorted(set(missing) - tied_names(self.model))  # save_pretrained writes a tied weight once
        if unexpected or untied:
            raise CrossLMError(
                f"'{path / 'model.safetensors'}' does not hold this client's model "
                f"({'unexpected ' + unexpected[0] if unexpected else 'no ' + untied[0]}); use a fresh work-dir"
            )
        self.round = int(state["round"])
        self.base_version = int(state["base_version"])
        self.metrics = state.get("metrics") or {}
        self.changed_since_round = bool(state.get("changed_since_round", False))
        keep = path / KEEP_FILE
        self.keep_targets = load_file(str(keep))["keep_targets"] if keep.is_file() else None
        if self.keep_targets is not None and self.keep_targets.shape != (
            len(self.data.train),
            self.task.num_labels,
        ):
            raise CrossLMError(
                f"'{keep}' holds predictions for {tuple(self.keep_targets.shape)} (texts, labels), not this "
                f"client's {len(self.data.train)} training texts and {self.task.num_labels} labels; use a fresh "
                "work-dir for new data"
            )
        return True


class Client(ClientBase[LabelledTexts]):
    """A classification task's client: its SLM is a sequence classifier trained on its labelled texts
    (supervised, with logit adjustment and, after an adopted reply, the keep_weight anchor)."""

    def _load_model(self) -> tuple[Any, Any]:
        return load_slm(self.slm, list(self.task.labels))

    def _score(self, data: LabelledTexts) -> dict[str, float]:
        kw = {"batch_size": self.eval_batch_size, "max_length": self.cfg.max_length}
        return evaluate(self.model, self.tokenizer, data, self.task.num_labels, **kw)

    def _logits(self, texts: list[str]) -> torch.Tensor:
        kw = {"batch_size": self.eval_batch_size, "max_length": self.cfg.max_length}
        return predict_logits(self.model, self.tokenizer, texts, **kw)

    def _predict(self, data: LabelledTexts) -> list[int]:
        return self._logits(data.texts).argmax(-1).tolist()

    def _held_out_metrics(self, outputs: list[Any]) -> dict[str, float]:
        return classification_metrics(self.data.held_out.labels, outputs, self.task.num_labels)

    def _worse_share(self, own: list[Any], offered: list[Any], update: int) -> float:
        return worse_share(self.data.held_out.labels, own, offered, self.task.num_labels, tolerance=self.cfg.accept_tolerance,
                           seed=pass_seed(self.seed, "accept", update))  # fmt: skip

    @property
    def tolerance(self) -> float:
        return self.cfg.accept_tolerance

    def _remember_adopted(self) -> None:
        """clients.keep_weight: the adopted model's predictions on the training texts, for later rounds."""
        if self.cfg.keep_weight > 0:
            self.keep_targets = torch.softmax(self._logits(self.data.train.texts), dim=-1)

    def _train_private(self, epochs: int, seed: int, desc: str) -> float:
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
            anchor=self.keep_targets,
            anchor_weight=self.cfg.keep_weight,
            desc=desc,
        )
