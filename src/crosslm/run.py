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
from crosslm.lifecycle import RunSession, check_runtime, make_run_dir
from crosslm.modeling.causal_slm import fit_pairs
from crosslm.runtime.inprocess import InProcessRuntime
from crosslm.task import GenerationPairs, LabelledTexts, TaskSpec


def run(cfg: RunConfig) -> Path:
    check_runtime(cfg, "centralized" if cfg.method == "centralized" else "inprocess")  # before the run dir
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
        for c in clients:  # what each client ends the run with (after its final local round, if any)
            interrupts.check()
            log(c.finish())
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
    configured schedule would give it (U * B / K + 1 rounds of E epochs: the first round and one after each
    reply), evaluated on the global test split."""
    from crosslm.precision import machine_info

    run_dir = make_run_dir(cfg)
    session = RunSession(cfg, run_dir, runtime="centralized")
    log, task, split = session.log, session.task, session.split
    union = type(split.train[0]).concat(split.train)
    slm = str(cfg.clients.slms[0])
    completed = False
    try:
        log({"event": "run_start", "seed": cfg.seed, "dataset": cfg.data.dataset, "labels": list(task.labels),
             "task_kind": task.kind, "runtime": "centralized", "machine": machine_info(),
             "clients": [{"client": "centralized", "slm": slm, "train_size": len(union),
                          "label_counts": union.label_counts(task.num_labels)}]})  # fmt: skip
        fed = cfg.federation
        epochs = (fed.updates * fed.buffer_size // cfg.data.num_clients + 1) * cfg.clients.epochs
        t0 = time.perf_counter()
        train = train_centralized_writer if task.kind == "generation" else train_centralized_classifier
        loss, metrics = train(cfg, task, slm, union, split.global_test, epochs)
        log({"event": "client_eval", "client": "centralized", "round": 1, "base_version": 0, "train_loss": loss,
             "epochs": epochs, "seconds": time.perf_counter() - t0, "global": metrics})  # fmt: skip
        completed = True
    finally:
        session.close(completed=completed, interrupted=False)
    return run_dir


def train_centralized_classifier(
    cfg: RunConfig, task: TaskSpec, slm: str, union: LabelledTexts, test: LabelledTexts, epochs: int
) -> tuple[float, dict[str, float]]:
    """A classifier SLM trained on `union` as a client trains; its metrics on `test`."""
    from crosslm.catalogue.models import load_slm
    from crosslm.modeling.slm import evaluate, train_supervised

    c = cfg.clients
    model, tok = load_slm(slm, list(task.labels))
    loss = train_supervised(model, tok, union, task.num_labels, epochs=epochs, lr=c.lr, batch_size=c.batch_size,
                            max_length=c.max_length, seed=cfg.seed, desc="centralized", autocast=c.autocast)  # fmt: skip
    kw = {"batch_size": cfg.eval.batch_size, "max_length": c.max_length}
    return loss, evaluate(model, tok, test, task.num_labels, **kw)


def train_centralized_writer(
    cfg: RunConfig, task: TaskSpec, slm: str, union: GenerationPairs, test: GenerationPairs, epochs: int
) -> tuple[float, dict[str, float]]:
    """A causal SLM tuned on the pairs of `union` as a client tunes it; its generation metrics on `test`."""
    from crosslm.catalogue.models import load_causal_slm
    from crosslm.evaluation.generation import evaluate_generation
    from crosslm.server.generation_update import pair_format

    c, fmt = cfg.clients, pair_format(cfg, task)
    model, tok = load_causal_slm(slm)
    loss = fit_pairs(model, tok, union.inputs, union.targets, lr=c.lr, batch_size=c.batch_size, seed=cfg.seed,
                     epochs=epochs, fmt=fmt, autocast=c.autocast, desc="centralized")  # fmt: skip
    return loss, evaluate_generation(model, tok, test.inputs, test.targets, max_new_tokens=fmt.max_target_tokens,
                                     fmt=fmt, batch_size=cfg.eval.batch_size)  # fmt: skip
