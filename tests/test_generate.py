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


def test_in_context_examples_rotate_over_the_candidates():
    from crosslm.server.generate import rotated_examples, with_examples

    cands = ["a", "b", "c", "d", "e"]
    assert [rotated_examples(cands, r, 2) for r in range(3)] == [["a", "b"], ["c", "d"], ["e", "a"]]
    assert rotated_examples(["a"], 4, 3) == ["a"] and rotated_examples([], 0, 2) == []
    prompt = with_examples("Write a positive review.", ["Great  film,\nloved it.", "x" * 500])
    assert prompt.startswith("Write a positive review.\n\nExamples:\n- Great film, loved it.\n- ")
    assert "x" * 301 not in prompt and prompt.endswith("different from the examples.")
    assert with_examples("P", []) == "P"


def test_each_prompt_shows_its_own_labels_examples(tiny_tokenizer, tiny_llm, monkeypatch):
    from crosslm.server import generate as gen

    seen_prompts: list[str] = []
    real = gen.sample_tokens

    def capture(model, prompts, **kw):
        seen_prompts.extend("".join(tiny_tokenizer.convert_ids_to_tokens(p)) for p in prompts)
        return real(model, prompts, **kw)

    monkeypatch.setattr(gen, "sample_tokens", capture)
    cfg = GenerationConfig(
        samples_per_label=2, batch_size=8, max_new_tokens=4, min_words=1, examples_per_prompt=1
    )
    examples = {0: ["dull plot", "flat acting"], 1: ["sharp script"]}
    generate_samples(tiny_llm, tiny_tokenizer, TASK, cfg, seen=set(), seed=1, examples=examples)
    neg, pos = seen_prompts[:2], seen_prompts[2:]
    assert "- dull plot" in neg[0] and "- flat acting" in neg[1]  # rotated per sample
    assert all("negative" in p and "sharp script" not in p for p in neg)
    assert all("- sharp script" in p for p in pos)


def test_each_sample_draws_one_attribute_and_the_draw_is_seeded(tiny_tokenizer, tiny_llm, monkeypatch):
    from crosslm.server import generate as gen

    seen_prompts: list[str] = []
    real = gen.sample_tokens

    def capture(model, prompts, **kw):
        seen_prompts.extend("".join(tiny_tokenizer.convert_ids_to_tokens(p)) for p in prompts)
        return real(model, prompts, **kw)

    monkeypatch.setattr(gen, "sample_tokens", capture)
    attrs = ["Keep it short.", "Write it in a casual tone.", "Mention the ending."]
    cfg = GenerationConfig(
        samples_per_label=12, batch_size=32, max_new_tokens=2, min_words=1, attributes=attrs
    )
    generate_samples(tiny_llm, tiny_tokenizer, TASK, cfg, seen=set(), seed=3)
    shown = [[a for a in attrs if a in p] for p in seen_prompts]
    assert all(len(s) == 1 for s in shown)  # exactly one attribute per prompt
    assert len({s[0] for s in shown}) == 3  # 24 draws reach every attribute
    assert all(("negative" in p) == (i < 12) for i, p in enumerate(seen_prompts))  # the label's prompt kept
    assert gen.drawn_attributes(attrs, 24, 3) == [s[0] for s in shown]  # from the seed alone
    assert gen.drawn_attributes([], 2, 3) == ["", ""]
