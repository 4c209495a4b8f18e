"""`crosslm` command line: run, flower, models, datasets.

    crosslm run [CONFIG] [--set key=value ...]            one machine, in-process runtime
    crosslm flower local [CONFIG] [--set key=value ...]   loopback Flower deployment (SuperLink + K SuperNodes)
    crosslm flower local --resume RUN_DIR                 continue a killed loopback run from its checkpoint
    crosslm flower certs OUT --nodes NAME ...             throw-away CA, server certificate and node keys
    crosslm flower submit [CONFIG] --superlink HOST:PORT --root-certificates CA --run-dir DIR
    crosslm experiment [CONFIG] [--set key=value ...]      methods x tasks x seeds -> results.md/.csv, plots
    crosslm models | crosslm datasets

A user's mistake ends in one clear paragraph and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from pathlib import Path

from crosslm import interrupts


def _print_status(rows: list[dict], title: str) -> None:
    print(title)
    for r in rows:
        mark = "installed" if r["installed"] else "missing  "
        kind = f"[{r['kind']}] " if "kind" in r else ""
        print(f"  {r['name']:24s} {mark}  {kind}{r['description']}")
        if not r["installed"]:
            print(f"  {'':24s} install: {r['install']}")
    print("Any other name is passed to transformers/datasets as a Hugging Face id or a local path.")


def main(argv: list[str] | None = None) -> int:
    interrupts.install()
    parser = argparse.ArgumentParser(
        prog="crosslm", description="CrossLM: mutual enhancement of LLM and SLMs."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run CrossLM on one machine (in-process runtime)")
    p_run.add_argument("config", nargs="?", help="YAML config (defaults apply to missing keys)")
    p_run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set federation.updates=3 (repeatable)",
    )
    p_run.add_argument(
        "--help-config", action="store_true", help="list every config key with default and help"
    )
    p_fl = sub.add_parser("flower", help="run CrossLM over Flower (real SuperLink and SuperNode processes)")
    fl_sub = p_fl.add_subparsers(dest="flower_command", required=True)
    p_local = fl_sub.add_parser(
        "local", help="start a SuperLink and K SuperNodes on loopback and run CrossLM"
    )
    p_submit = fl_sub.add_parser("submit", help="submit a CrossLM run to a running SuperLink (multi-machine)")
    for p in (p_local, p_submit):
        p.add_argument("config", nargs="?", help="YAML config (defaults apply to missing keys)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key (repeatable)")  # fmt: skip
    p_local.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue a killed or interrupted `flower local` run from its checkpoint, with its saved "
        "config (only flower.* keys may be --set)",
    )
    p_submit.add_argument("--superlink", required=True, help="the SuperLink's address, HOST:PORT")
    p_submit.add_argument(
        "--root-certificates", help="CA certificate that signed the SuperLink's certificate"
    )
    p_submit.add_argument("--insecure", action="store_true", help="no TLS (never across machines)")
    p_submit.add_argument("--run-dir", required=True, help="run directory on the server machine")
    p_certs = fl_sub.add_parser("certs", help="generate a throw-away CA, SuperLink certificate and node keys")
    p_certs.add_argument("out", help="folder to write ca.crt, server.pem, server.key and <node>/<node>.pub")
    p_certs.add_argument("--nodes", nargs="+", default=[], metavar="NAME", help="node key pairs to create")
    p_certs.add_argument("--hosts", nargs="+", default=["localhost", "127.0.0.1", "::1"],
                         help="names and addresses the SuperLink certificate is valid for")  # fmt: skip
    p_exp = sub.add_parser("experiment", help="run a grid of methods x tasks x seeds and tabulate it")
    p_exp.add_argument("config", nargs="?", help="experiment YAML (see configs/experiments/)")
    p_exp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override an experiment key, e.g. --set seeds=[0], --set overrides.federation.updates=2 "
                            "or --set task_overrides.trec.feedback.tau=0.3")  # fmt: skip
    p_exp.add_argument("--results-only", action="store_true", help="rebuild results from finished cells")
    sub.add_parser("models", help="list the offline model catalogue")
    sub.add_parser("datasets", help="list the offline dataset catalogue")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    from crosslm.errors import CrossLMError

    try:
        if args.command == "models":
            from crosslm.catalogue.models import catalogue_status

            _print_status(catalogue_status(), "Models:")
        elif args.command == "datasets":
            from crosslm.catalogue.datasets import catalogue_status as dataset_status

            _print_status(dataset_status(), "Datasets:")
        elif args.command == "run":
            from crosslm.config import config_help, load_config

            if args.help_config:
                print(config_help())
                return 0
            cfg = load_config(args.config, args.overrides)
            from crosslm.run import run

            run(cfg)
        elif args.command == "flower":
            _flower(args)
        elif args.command == "experiment":
            from crosslm.experiment.grid import load_experiment
            from crosslm.experiment.results import write_results
            from crosslm.experiment.runner import run_experiment

            exp = load_experiment(args.config, args.overrides)
            root = (
                write_results(exp, Path(exp.output_dir) / exp.name)
                if args.results_only
                else run_experiment(exp)
            )
            print((root / "results.md").read_text())
            print(f"results: {root / 'results.md'}, {root / 'results.csv'}, {root / 'plots'}")
        return 0
    except CrossLMError as e:
        print("crosslm: error: " + textwrap.fill(str(e), width=100, subsequent_indent="  "), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "\ncrosslm: interrupted; files written so far are complete and the report marks the run as "
            "interrupted.",
            file=sys.stderr,
        )
        return 130


def _flower(args: argparse.Namespace) -> None:
    from crosslm.config import load_config
    from crosslm.runtime.flower import deploy

    if args.flower_command == "certs":
        out = deploy.generate_pki(Path(args.out), args.nodes, tuple(args.hosts))
        print(f"wrote {', '.join(sorted(p.name for p in out.iterdir()))} to {out}")
        print("Keep ca.key and every node's private key secret; give each node only its own key.")
        return
    from crosslm.errors import ConfigError
    from crosslm.lifecycle import check_runtime, prepare_data

    if args.flower_command == "local" and args.resume:
        run_dir = Path(args.resume)
        if args.config:
            raise ConfigError(
                f"--resume takes the config saved in '{run_dir}/config.yaml'; drop the config file argument"
            )
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"--resume '{run_dir}' holds no config.yaml: it is not a crosslm run directory")
        bad = [o for o in args.overrides if not o.startswith("flower.")]
        if bad:
            raise ConfigError(f"--resume allows only flower.* overrides; got '{bad[0]}'")
        deploy.run_local(load_config(run_dir / "config.yaml", args.overrides), resume=run_dir)
        return
    cfg = load_config(args.config, args.overrides)
    check_runtime(cfg, "flower")
    if args.flower_command == "local":
        deploy.run_local(cfg)
        return
    if not args.insecure and not args.root_certificates:
        raise ConfigError("--root-certificates is required (or --insecure, for a trial without TLS)")
    task, _ = prepare_data(cfg)
    run_id = deploy.submit_run(
        cfg, task, Path(args.run_dir), args.superlink, args.root_certificates, args.insecure
    )
    print(f"submitted run {run_id}; follow it with: flwr log {run_id} <connection> --stream")


if __name__ == "__main__":
    sys.exit(main())
