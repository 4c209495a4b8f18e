"""`crosslm` command line: run, models, datasets.

    crosslm run [CONFIG] [--set key=value ...]
    crosslm models | crosslm datasets

A user's mistake ends in one clear paragraph and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap


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


if __name__ == "__main__":
    sys.exit(main())
