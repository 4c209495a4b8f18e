"""Write a catalogue task's texts as a CSV a user could bring: the data behind docs/results.md#guards.

    python scripts/catalogue_csv.py rotten-tomatoes shuffled.csv --shuffle
        labels shuffled over the texts: nothing to learn (the no-signal case)
    python scripts/catalogue_csv.py trec questions.csv --labels HUM=person LOC=place NUM=number
        three of trec's labels under new names: a dataset the catalogue does not know

Columns: text, label. The shuffle is seeded (--seed).
"""

from __future__ import annotations

import argparse
import csv
import random
from pathlib import Path

from crosslm.catalogue.datasets import load_task_data
from crosslm.config import DataConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("task", help="catalogue task name, e.g. rotten-tomatoes")
    ap.add_argument("out", type=Path, help="CSV file to write")
    ap.add_argument("--shuffle", action="store_true", help="shuffle the labels over the texts")
    ap.add_argument("--labels", nargs="*", default=[], metavar="OLD=NEW", help="keep these labels, renamed")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    task, data = load_task_data(DataConfig(dataset=args.task))
    rename = dict(pair.split("=", 1) for pair in args.labels)
    unknown = sorted(set(rename) - set(task.labels))
    if unknown:
        ap.error(f"{args.task} has no label {unknown[0]!r}; its labels are {', '.join(task.labels)}")
    rows = [(t, task.labels[y]) for t, y in zip(data.texts, data.labels, strict=True)]
    if rename:
        rows = [(t, rename[y]) for t, y in rows if y in rename]
    if args.shuffle:
        labels = [y for _, y in rows]
        random.Random(args.seed).shuffle(labels)
        rows = [(t, y) for (t, _), y in zip(rows, labels, strict=True)]
    with args.out.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    print(f"{args.out}: {len(rows)} rows, labels {sorted({y for _, y in rows})}")


if __name__ == "__main__":
    main()
