"""The main job on one machine: config -> run directory, with every client in this process.

The lifecycle (run directory, data, clients, server, measurements, report) is `crosslm.lifecycle`'s; this
file adds the in-process runtime that moves the messages, and the centralized upper bound.
"""

from __future__ import annotations

import time
from pathlib import Path

from crosslm import interrupts
from crosslm.config import RunConfig
from crosslm.evaluation.report import summary_table
from crosslm.lifecycle import RunSession, make_run_dir
from crosslm.runtime.inprocess import InProcessRuntime
from crosslm.task import LabelledTexts


def run(cfg: RunConfig) -> Path:
    if cfg.method == "centralized":
        return run_centralized(cfg)
    run_dir = make_run_dir(cfg)
    session = RunSession(cfg, run_dir, runtime="inprocess")
    log = session.log
    interrupted = completed = False
    clients = []
    try:
        clients = session.build_clients()
        session.log_start(
            [
                {
                    "client": c.client_id,
                    "slm": c.slm,
                    "speed": float(cfg.clients.speeds[i % len(cfg.clients.speeds)]),
                    "train_size": len(c.data.train),
                    "test_size": len(c.data.test),
                    "label_counts": c.data.train.label_counts(session.task.num_labels),
                }
                for i, c in enumerate(clients)
            ]
        )
        server = session.build_server()
        session.measure_start()
        InProcessRuntime(
            clients, server, cfg.clients, cfg.federation, log=log, clock=log.set_clock, seed=cfg.seed
        ).run()
        for c in clients:  # what each client ends the run with (its current weights)
            log({"event": "client_eval", "client": c.client_id, "round": c.round,
                 "base_version": c.base_version, **(c.metrics or c.evaluate())})  # fmt: skip
        session.measure_end()
        interrupts.check()
        completed = True
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if completed:  # models are saved only from a finished run; everything written so far stays valid
            for c in clients:
                c.save(run_dir / "clients" / c.client_id)
            session.save_adapter()
        events = session.close(completed=completed, interrupted=interrupted)
    if interrupted:
        raise KeyboardInterrupt
    print(summary_table(events))
    print(f"\nrun directory: {run_dir}\nreport: {run_dir / 'report.md'}")
    return run_dir


def run_centralized(cfg: RunConfig) -> Path:
    """The upper bound no federated method may have: one SLM (the first of clients.slms) trained on the
    union of every client's training data, for as many epochs as one client's local rounds under the
    configured schedule would give it (U / K + 1 rounds of E epochs), evaluated on the global test split."""
    from crosslm.catalogue.models import load_slm
    from crosslm.modeling.slm import evaluate, train_supervised
    from crosslm.precision import machine_info

    run_dir = make_run_dir(cfg)
    session = RunSession(cfg, run_dir, runtime="centralized")
    log, task, split = session.log, session.task, session.split
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
        session.close(completed=completed, interrupted=False)
    return run_dir
