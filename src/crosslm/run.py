"""The main job: one CrossLM run on one machine, from config to run directory.

config -> data + federation split -> clients (local SLMs) -> server (LLM + LoRA) -> in-process runtime
-> saved models, metrics.jsonl, synthetic.jsonl, report.md with plots.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from crosslm import interrupts
from crosslm.catalogue.datasets import load_general_text, load_task_data
from crosslm.catalogue.models import load_llm
from crosslm.client.client import Client, ClientData
from crosslm.config import RunConfig, save_config
from crosslm.errors import CrossLMError
from crosslm.evaluation.perplexity import perplexity
from crosslm.evaluation.report import summary_table, write_report
from crosslm.io import JsonlWriter, read_jsonl
from crosslm.partition import FederatedSplit, federated_split
from crosslm.precision import machine_info
from crosslm.runtime.inprocess import InProcessRuntime
from crosslm.seeding import seed_everything
from crosslm.server.server import CrossLMServer
from crosslm.server.tune_llm import add_lora
from crosslm.task import LabelledTexts, TaskSpec


def make_run_dir(cfg: RunConfig, *, resume: bool = False) -> Path:
    """The run directory; an existing run is refused unless `resume` (the Flower server's restart)."""
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
    """metrics.jsonl writer that stamps each event with the virtual time and the wall time."""

    def __init__(self, path: Path, keep_lines: int | None = None):
        self.writer = JsonlWriter(path, keep_lines)
        self.start = time.perf_counter()
        self.t = 0.0
        self.clock: Callable[[], float] | None = None  # a runtime on real time sets this (Flower)

    def set_clock(self, t: float) -> None:
        self.t = t

    def __call__(self, event: dict[str, Any]) -> None:
        peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux reports KiB
        t = self.clock() if self.clock is not None else self.t
        self.writer.write(
            {
                **event,
                "t": round(t, 3),
                "wall": round(time.perf_counter() - self.start, 2),
                "peak_rss_gib": round(peak_gib, 2),
            }
        )


def prepare_data(cfg: RunConfig) -> tuple[TaskSpec, FederatedSplit]:
    """The task and its seeded federated split; every runtime (and every Flower node) gets the same."""
    task, data = load_task_data(cfg.data)
    return task, split_task_data(cfg, task, data)


def split_task_data(cfg: RunConfig, task: TaskSpec, data: LabelledTexts) -> FederatedSplit:
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


def build_server(
    cfg: RunConfig, task: TaskSpec, global_test: LabelledTexts, log: RunLog, synthetic: JsonlWriter
) -> CrossLMServer:
    """Load the LLM, wrap it with a fresh LoRA adapter and build the server around it (a baseline whose
    server never uses the LLM gets none)."""
    llm = tok = None
    if cfg.federation.server_update == "crosslm":
        llm, tok = load_llm(cfg.llm.model)
        llm = add_lora(llm, cfg.llm)
    eval_idx = list(range(min(cfg.eval.llm_eval_size, len(global_test))))
    llm_eval = LabelledTexts(
        [global_test.texts[i] for i in eval_idx], [global_test.labels[i] for i in eval_idx]
    )
    return CrossLMServer(cfg, task, llm, tok, llm_eval, log=log, log_synthetic=synthetic.write)


def setup_torch(cfg: RunConfig) -> None:
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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


def run(cfg: RunConfig) -> Path:
    if cfg.method == "centralized":
        return run_centralized(cfg)
    setup_torch(cfg)
    d = cfg.data
    task, split = prepare_data(cfg)
    general = load_general_text()
    run_dir = make_run_dir(cfg)
    save_config(cfg, run_dir / "config.yaml")
    log = RunLog(run_dir / "metrics.jsonl")
    synthetic = JsonlWriter(run_dir / "synthetic.jsonl")
    interrupted = completed = False
    server: CrossLMServer | None = None
    clients: list[Client] = []
    try:
        max_bytes = int(cfg.federation.max_payload_mb * 1024 * 1024)
        for k in range(d.num_clients):
            slm = str(cfg.clients.slms[k % len(cfg.clients.slms)])
            clients.append(
                Client(
                    f"client-{k}",
                    slm,
                    task,
                    ClientData(split.train[k], split.test[k], split.global_test),
                    cfg.clients,
                    eval_batch_size=cfg.eval.batch_size,
                    max_payload_bytes=max_bytes,
                    seed=cfg.seed * 101 + k,
                )
            )
        log(
            {
                "event": "run_start",
                "seed": cfg.seed,
                "dataset": d.dataset,
                "labels": list(task.labels),
                "task_wording": task.wording(),
                "llm": cfg.llm.model,
                "runtime": "inprocess",
                "machine": machine_info(),
                "clients": [
                    {
                        "client": c.client_id,
                        "slm": c.slm,
                        "speed": float(cfg.clients.speeds[i % len(cfg.clients.speeds)]),
                        "train_size": len(c.data.train),
                        "test_size": len(c.data.test),
                        "label_counts": c.data.train.label_counts(task.num_labels),
                    }
                    for i, c in enumerate(clients)
                ],
            }
        )
        server = build_server(cfg, task, split.global_test, log, synthetic)
        if server.llm is not None:
            log_perplexity(log, server, general, "start")
            server.evaluate_llm(0)
        InProcessRuntime(
            clients, server, cfg.clients, cfg.federation, log=log, clock=log.set_clock, seed=cfg.seed
        ).run()
        for c in clients:  # what each client ends the run with (its current weights)
            log({"event": "client_eval", "client": c.client_id, "round": c.round,
                 "base_version": c.base_version, **(c.metrics or c.evaluate())})  # fmt: skip
        if server.llm is not None:
            log_perplexity(log, server, general, "end")
        interrupts.check()
        completed = True
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if completed:  # models are saved only from a finished run; everything written so far stays valid
            for c in clients:
                c.save(run_dir / "clients" / c.client_id)
            if server is not None and server.llm is not None:
                server.save_adapter(run_dir / "llm_adapter")
        events = close_run(
            run_dir,
            log,
            synthetic,
            cfg,
            updates=server.update if server else 0,
            completed=completed,
            interrupted=interrupted,
        )
    if interrupted:
        raise KeyboardInterrupt
    print(summary_table(events))
    print(f"\nrun directory: {run_dir}\nreport: {run_dir / 'report.md'}")
    return run_dir


def log_perplexity(log: RunLog, server: CrossLMServer, texts: list[str], stage: str) -> None:
    """Held-out general-text perplexity of the LLM with its current adapter (the generality check), in
    float32 always (a 1 % target needs it), with the adapter merged in (the same function, less work)."""
    from crosslm.server.decoding import generation_model

    cfg = server.cfg
    model = generation_model(server.llm, torch.float32, lean=False)
    ppl, n = perplexity(model, server.tokenizer, texts, max_tokens=cfg.eval.general_text_tokens)
    log({"event": "perplexity", "stage": stage, "update": server.update, "perplexity": ppl, "tokens": n})


def run_centralized(cfg: RunConfig) -> Path:
    """The upper bound no federated method may have: one SLM (the first of clients.slms) trained on the
    union of every client's training data, for as many epochs as one client's local rounds under the
    configured schedule would give it (U / K + 1 rounds of E epochs), evaluated on the global test split."""
    from crosslm.catalogue.models import load_slm
    from crosslm.client.trainer import evaluate, train_supervised

    setup_torch(cfg)
    task, split = prepare_data(cfg)
    run_dir = make_run_dir(cfg)
    save_config(cfg, run_dir / "config.yaml")
    log = RunLog(run_dir / "metrics.jsonl")
    synthetic = JsonlWriter(run_dir / "synthetic.jsonl")
    union = LabelledTexts(
        [t for part in split.train for t in part.texts], [y for part in split.train for y in part.labels]
    )
    slm = str(cfg.clients.slms[0])
    completed = False
    try:
        log({"event": "run_start", "seed": cfg.seed, "dataset": cfg.data.dataset, "labels": list(task.labels),
             "runtime": "centralized", "machine": machine_info(),
             "clients": [{"client": "centralized", "slm": slm, "train_size": len(union),
                          "label_counts": union.label_counts(task.num_labels)}]})  # fmt: skip
        model, tok = load_slm(slm, list(task.labels))
        rounds = cfg.federation.updates // cfg.data.num_clients + 1
        t0 = time.perf_counter()
        loss = train_supervised(
            model, tok, union, task.num_labels, epochs=rounds * cfg.clients.epochs, lr=cfg.clients.lr,
            batch_size=cfg.clients.batch_size, max_length=cfg.clients.max_length, seed=cfg.seed, desc="centralized",
            autocast=cfg.clients.autocast,
        )  # fmt: skip
        kw = {"batch_size": cfg.eval.batch_size, "max_length": cfg.clients.max_length}
        metrics = {"global": evaluate(model, tok, split.global_test, task.num_labels, **kw)}
        log({"event": "client_eval", "client": "centralized", "round": 1, "base_version": 0, "train_loss": loss,
             "epochs": rounds * cfg.clients.epochs, "seconds": time.perf_counter() - t0, **metrics})  # fmt: skip
        completed = True
    finally:
        close_run(run_dir, log, synthetic, cfg, updates=0, completed=completed, interrupted=False)
    return run_dir
