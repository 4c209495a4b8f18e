"""One run's lifecycle, shared by every runtime.

open the run directory -> build the clients (in-process) and the server for the method -> measure the
starting point -> [the runtime moves messages] -> measure the end -> save the models -> close the run with
run_end and report.md. `crosslm run` (runtime/inprocess.py) and the Flower ServerApp
(runtime/flower/server_app.py) both go through `RunSession`, so a method runs the same way on either, and a
method a runtime cannot run is refused up front by `check_runtime`.
"""

from __future__ import annotations

import os
import resource
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from crosslm.catalogue.datasets import load_general_text, load_generation_data, load_task_data, task_kind
from crosslm.catalogue.models import check_slms, load_llm
from crosslm.client.client import Client, ClientBase, ClientData
from crosslm.client.generation_client import GenerationClient
from crosslm.config import RunConfig, save_config
from crosslm.errors import ConfigError, CrossLMError
from crosslm.evaluation.perplexity import perplexity
from crosslm.evaluation.report import write_report
from crosslm.io import JsonlWriter, read_jsonl
from crosslm.partition import FederatedSplit, federated_split
from crosslm.precision import machine_info
from crosslm.seeding import pass_seed, seed_everything
from crosslm.server.server import CrossLMServer
from crosslm.server.tune_llm import add_lora
from crosslm.task import GenerationPairs, LabelledTexts, TaskSpec

TaskData = LabelledTexts | GenerationPairs

# Methods a runtime cannot run, with the one-line reason it is refused.
UNSUPPORTED: dict[str, dict[str, str]] = {
    "flower": {
        "centralized": "method 'centralized' trains one SLM on the pooled data of every client, which "
        "separate Flower nodes never pool; run it with `crosslm run`",
    },
}


def check_runtime(cfg: RunConfig, runtime: str) -> None:
    """Refuse, before any work, a method that `runtime` cannot run, and settings that do not fit the task's
    kind (`check_task_kind`)."""
    reason = UNSUPPORTED.get(runtime, {}).get(cfg.method)
    if reason:
        raise ConfigError(reason)
    check_task_kind(cfg)


def check_task_kind(cfg: RunConfig) -> None:
    """Settings that must fit the task's kind (known from data.dataset and data.target_column without
    reading the data): every SLM a model of that kind, and no classifier-only option on a generation task."""
    kind = task_kind(cfg.data)
    check_slms([str(s) for s in cfg.clients.slms], kind)
    if kind == "generation" and cfg.clients.keep_weight > 0:
        raise ConfigError(
            f"config key 'clients.keep_weight' = {cfg.clients.keep_weight!r}: expected 0 for a generation task "
            "(it anchors a classifier's label predictions; a generation task's SLMs write text)."
        )


def make_run_dir(cfg: RunConfig, *, resume: bool = False) -> Path:
    """The run directory; an existing run is refused unless `resume` (a restarted server)."""
    name = cfg.name or f"{Path(cfg.data.dataset).stem}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(cfg.output_dir) / name
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise CrossLMError(
            f"output directory '{run_dir}' is not writable ({e.strerror}); set output_dir to a folder you can "
            "write, e.g. --set output_dir=/tmp/crosslm-runs."
        ) from None
    if not resume and (run_dir / "metrics.jsonl").exists():
        raise CrossLMError(
            f"run directory '{run_dir}' already holds a run; choose another --set name=... so nothing is overwritten."
        )
    return run_dir


class RunLog:
    """metrics.jsonl writer that stamps each event with the virtual time and the wall time. Thread-safe:
    the Flower server logs node events while an update runs in another thread."""

    def __init__(self, path: Path, keep_lines: int | None = None):
        self.writer = JsonlWriter(path, keep_lines)
        self.start = time.perf_counter()
        self.t = 0.0
        self.clock: Callable[[], float] | None = None  # a runtime on real time sets this (Flower)
        self._lock = threading.Lock()

    def set_clock(self, t: float) -> None:
        self.t = t

    def __call__(self, event: dict[str, Any]) -> None:
        peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux reports KiB
        with self._lock:
            t = self.clock() if self.clock is not None else self.t
            self.writer.write(
                {
                    **event,
                    "t": round(t, 3),
                    "wall": round(time.perf_counter() - self.start, 2),
                    "peak_rss_gib": round(peak_gib, 2),
                }
            )


def load_data(cfg: RunConfig) -> tuple[TaskSpec, TaskData]:
    """The task and its cleaned examples: labelled texts, or (input, target, condition) pairs for a
    generation task."""
    if task_kind(cfg.data) == "generation":
        return load_generation_data(cfg.data)
    return load_task_data(cfg.data)


def prepare_data(cfg: RunConfig) -> tuple[TaskSpec, FederatedSplit]:
    """The task and its seeded federated split; every runtime (and every Flower node) gets the same."""
    task, data = load_data(cfg)
    return task, split_task_data(cfg, task, data)


def split_task_data(cfg: RunConfig, task: TaskSpec, data: TaskData) -> FederatedSplit:
    """The seeded federated split of already loaded task data (`prepare_data` without the loading).

    With `eval.split: validation` the global metrics are measured on the validation split instead of the
    test split; the clients hold exactly the same data either way."""
    d = cfg.data
    validate = cfg.eval.split == "validation"
    split = federated_split(
        data,
        task.num_labels,
        d.num_clients,
        d.dirichlet_alpha,
        d.train_per_client,
        d.test_per_client,
        d.global_test_size,
        cfg.seed,
        label_names=list(task.labels),
        validation_size=d.global_test_size if validate else 0,
    )
    if validate:
        split.global_test, split.global_test_idx = split.validation, split.validation_idx
    return split


def setup_torch(cfg: RunConfig) -> None:
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def client_seed(run_seed: int, index: int) -> int:
    """The seed of client `index`'s training passes, the same in every runtime."""
    return pass_seed(run_seed, "client", index)


def build_client(
    cfg: RunConfig, task: TaskSpec, client_id: str, slm: str, data: ClientData, index: int
) -> ClientBase:
    """The client of the task's kind: a classifier's (`Client`) or a headline writer's (`GenerationClient`)."""
    kw: dict[str, Any] = {
        "eval_batch_size": cfg.eval.batch_size,
        "max_payload_bytes": int(cfg.federation.max_payload_mb * 1024 * 1024),
        "seed": client_seed(cfg.seed, index),
    }
    if task.kind == "generation":
        return GenerationClient(client_id, slm, task, data, cfg.clients, task_cfg=cfg.generation_task, **kw)
    return Client(client_id, slm, task, data, cfg.clients, **kw)


def build_server(
    cfg: RunConfig, task: TaskSpec, global_test: TaskData, log: RunLog, synthetic: JsonlWriter
) -> CrossLMServer:
    """Load the LLM, wrap it with a fresh LoRA adapter and build the server around it (a baseline whose
    server never uses the LLM gets none)."""
    llm = tok = None
    if cfg.federation.server_update == "crosslm":
        llm, tok = load_llm(cfg.llm.model)
        llm = add_lora(llm, cfg.llm)
    llm_eval = global_test.subset(list(range(min(cfg.eval.llm_eval_size, len(global_test)))))
    return CrossLMServer(cfg, task, llm, tok, llm_eval, log=log, log_synthetic=synthetic.write)


def log_perplexity(log: RunLog, server: CrossLMServer, texts: list[str], stage: str) -> None:
    """Held-out general-text perplexity of the LLM with its current adapter (the generality check), in
    float32 always (a 1 % target needs it), with the adapter merged in (the same function, less work)."""
    from crosslm.server.decoding import generation_model

    cfg = server.cfg
    model = generation_model(server.llm, torch.float32, lean=False)
    ppl, n = perplexity(model, server.tokenizer, texts, max_tokens=cfg.eval.general_text_tokens)
    log({"event": "perplexity", "stage": stage, "update": server.update, "perplexity": ppl, "tokens": n})


def close_run(
    run_dir: Path,
    log: RunLog,
    synthetic: JsonlWriter,
    cfg: RunConfig,
    *,
    updates: int,
    completed: bool,
    interrupted: bool,
) -> list[dict[str, Any]]:
    """Log run_end, close the logs and write report.md; returns the run's events."""
    log(
        {
            "event": "run_end",
            "updates": updates,
            "wall": time.perf_counter() - log.start,
            "interrupted": not completed,  # Ctrl-C or an error: the run did not finish
            "reason": "completed" if completed else ("interrupted" if interrupted else "error"),
        }
    )
    log.writer.close()
    synthetic.close()
    events = read_jsonl(run_dir / "metrics.jsonl")
    write_report(run_dir, events, cfg.to_dict())
    return events


def close_stopped_run(run_dir: Path, cfg: RunConfig, *, reason: str) -> list[dict[str, Any]]:
    """Close a run whose server process was stopped from outside (a signal to `crosslm flower local`):
    append run_end unless the server wrote one, and write report.md. A later resume cuts the log back to
    its checkpoint, so this run_end does not stay in a resumed run."""
    events = read_jsonl(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else []
    if not any(e.get("event") == "run_end" for e in events):
        writer = JsonlWriter(run_dir / "metrics.jsonl")
        done = sum(1 for e in events if e.get("event") == "server_update")
        writer.write({"event": "run_end", "updates": done, "interrupted": True, "reason": reason})
        writer.close()
        events = read_jsonl(run_dir / "metrics.jsonl")
    write_report(run_dir, events, cfg.to_dict())
    return events


class RunSession:
    """The parts of a run every runtime shares: its directory, logs, data, server and measurements."""

    def __init__(self, cfg: RunConfig, run_dir: Path, *, runtime: str, resume_state: dict | None = None):
        check_runtime(cfg, runtime)
        self.cfg, self.run_dir, self.runtime = cfg, Path(run_dir), runtime
        setup_torch(cfg)
        self.task, self.split = prepare_data(cfg)
        self.general = load_general_text()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.run_dir / "config.yaml")
        keep = resume_state or {}
        self.log = RunLog(self.run_dir / "metrics.jsonl", keep_lines=keep.get("log_lines", 0))
        self.synthetic = JsonlWriter(
            self.run_dir / "synthetic.jsonl", keep_lines=keep.get("synthetic_lines", 0)
        )
        self.server: CrossLMServer | None = None

    def build_clients(self) -> list[ClientBase]:
        """The K simulated clients of a one-machine run, each with its SLM and its partition."""
        cfg, split = self.cfg, self.split
        slms = cfg.clients.slms
        return [
            build_client(cfg, self.task, f"client-{k}", str(slms[k % len(slms)]),
                         ClientData(split.train[k], split.test[k], split.global_test), k)
            for k in range(cfg.data.num_clients)
        ]  # fmt: skip

    def log_start(self, clients: list[dict[str, Any]]) -> None:
        self.log(
            {
                "event": "run_start",
                "seed": self.cfg.seed,
                "dataset": self.cfg.data.dataset,
                "labels": list(self.task.labels),
                "task_kind": self.task.kind,
                "task_description": self.task.description,
                "task_wording": self.task.wording(),
                "llm": self.cfg.llm.model,
                "method": self.cfg.method,
                "runtime": self.runtime,
                "machine": machine_info(),
                "clients": clients,
            }
        )

    def build_server(self) -> CrossLMServer:
        self.server = build_server(self.cfg, self.task, self.split.global_test, self.log, self.synthetic)
        return self.server

    def measure_start(self) -> None:
        """The LLM's starting point: general-text perplexity and zero-shot accuracy (no LLM: nothing)."""
        assert self.server is not None
        if self.server.llm is not None:
            log_perplexity(self.log, self.server, self.general, "start")
            self.server.evaluate_llm(0)

    def measure_end(self) -> None:
        assert self.server is not None
        if self.server.llm is not None:
            log_perplexity(self.log, self.server, self.general, "end")

    def save_adapter(self) -> None:
        if self.server is not None and self.server.llm is not None:
            self.server.save_adapter(self.run_dir / "llm_adapter")

    def close(self, *, completed: bool, interrupted: bool) -> list[dict[str, Any]]:
        return close_run(
            self.run_dir,
            self.log,
            self.synthetic,
            self.cfg,
            updates=self.server.update if self.server else 0,
            completed=completed,
            interrupted=interrupted,
        )
