"""Synthetic-data generation: cleaning, per-label counts, de-duplication across updates."""

from __future__ import annotations

from crosslm.config import GenerationConfig
from crosslm.server.generate import clean_sample, content_hash, generate_samples
from tests.conftest import TOY_TASK as TASK


def test_clean_sample():
    assert clean_sample("Here is a review:\nGreat acting and a sharp script.", False, 3) == (
        "Great acting and a sharp script."
    )
    assert clean_sample('"A quoted review that works."', False, 3) == "A quoted review that works."
    # cut off by the token limit: drop the unfinished sentence when enough words remain
    assert (
        clean_sample("It was great. The plot was fun. And then the", True, 3)
        == "It was great. The plot was fun."
    )
    assert clean_sample("Too short. And then the", True, 5) == "Too short. And then the"


def test_content_hash_normalises_case_and_space():
    assert content_hash("A  Good film") == content_hash("a good film")
    assert content_hash("a good film") != content_hash("a bad film")


def test_generate_counts_labels_and_dedupes(tiny_tokenizer, tiny_llm):
    cfg = GenerationConfig(samples_per_label=3, batch_size=4, max_new_tokens=12, min_words=1)
    seen: set[str] = set()
    samples, stats = generate_samples(tiny_llm, tiny_tokenizer, TASK, cfg, seen=seen, seed=1)
    assert stats.generated == 6
    assert stats.kept == len(samples) <= 6 and stats.tokens > 0
    assert all(s.label in (0, 1) for s in samples)
    assert [s.label for s in samples].count(0) <= 3
    assert len({s.hash for s in samples}) == len(samples)
    assert seen == {s.hash for s in samples}
    # the same seed writes the same texts again: all are duplicates of the earlier update now
    again, _ = generate_samples(tiny_llm, tiny_tokenizer, TASK, cfg, seen=seen, seed=1)
    assert again == []
