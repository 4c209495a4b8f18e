"""A generation task's experiment measures: the writer judge (a causal LM tuned on real pairs) on a tiny
model, a generation cell's row and the generation tables and targets."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from crosslm.evaluation import judge as judge_module
from crosslm.experiment.results import ZERO_SHOT, WriterJudge, cell_row, results_markdown
from crosslm.modeling.causal_slm import PairFormat
from crosslm.task import GenerationPairs, TaskSpec
from tests.conftest import make_llm, make_tokenizer

TASK = TaskSpec(name="pets", labels=("cats", "dogs"), descriptions=("cats", "dogs"), verbalizer=("Cats", "Dogs"),
                generation_prompt="Write a story about {description}.", classification_prompt="",
                kind="generation", target_noun="headline")  # fmt: skip
FMT = PairFormat("headline", max_input_tokens=32, max_target_tokens=10)


def _pairs(n: int, offset: int = 0) -> GenerationPairs:
    topics = ["cats", "dogs"]
    rows = [topics[i % 2] for i in range(offset, offset + n)]
    return GenerationPairs([f"{t} story {i}" for i, t in enumerate(rows)], [f"{t} win" for t in rows],
                           [i % 2 for i in range(offset, offset + n)])  # fmt: skip


@pytest.fixture(scope="module")
def writer(tmp_path_factory):
    """A writer judge tuned on tiny pairs, and the number of times a base model was loaded to train one."""
    cache = tmp_path_factory.mktemp("cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("CROSSLM_CACHE", str(cache))
    real_load = judge_module.load_causal_slm
    trained = []

    def load(name):
        if name == "base":
            trained.append(name)
            return make_llm(len(tok)), tok
        return real_load(name)

    tok = make_tokenizer(chat=False)
    mp.setattr(judge_module, "load_causal_slm", load)
    mp.setattr(judge_module, "llm_path", lambda name: name)
    got = judge_module.load_writer_judge(TASK, _pairs(32), _pairs(8, 32), fmt=FMT, epochs=60, seed=0, lr=5e-3,
                                         base="base")  # fmt: skip
    again = judge_module.load_writer_judge(TASK, _pairs(32), _pairs(8, 32), fmt=FMT, epochs=60, seed=0, lr=5e-3,
                                           base="base")  # fmt: skip
    yield got, again, trained
    mp.undo()


def test_the_writer_judge_learns_real_pairs_and_is_cached(writer):
    (model, tok, info), (_, _, cached_info), trained = writer
    assert trained == ["base"] and cached_info == info  # the second call loaded the cached judge
    assert info["train_size"] == 32 and info["global_test"]["n"] == 8
    assert (
        info["global_test"]["target_perplexity"] < 20
    )  # it learnt "<topic> win" (101 characters: ~101 untuned)
    real = judge_module.pair_quality(model, tok, ["cats story 1", "dogs story 2"], ["cats win", "dogs win"],
                                     fmt=FMT, reference=info["global_test"]["median_loglik"])  # fmt: skip
    wrong = judge_module.pair_quality(model, tok, ["cats story 1", "dogs story 2"], ["zq xv", "dogs lose!"],
                                      fmt=FMT, reference=info["global_test"]["median_loglik"])  # fmt: skip
    assert real["real_like"] >= 0.5 and wrong["real_like"] == 0.0  # the median real pair is the reference
    assert wrong["target_perplexity"] > 3 * real["target_perplexity"]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_a_generation_cell_row_reads_rouge_l_and_judges_the_distilled_pairs(tmp_path, writer):
    (model, tok, info), _, _ = writer
    g = lambda r: {"global": {"rouge_l": r, "target_perplexity": 50.0}, "local": {"rouge_l": r + 0.1}}  # noqa: E731
    _write(tmp_path / "metrics.jsonl", [
        {"event": "run_start", "task_kind": "generation"},
        {"event": "client_trained", "client": "a", "round": 1, "seconds": 2.0, **g(0.10)},
        {"event": "client_trained", "client": "b", "round": 1, "seconds": 3.0, **g(0.20)},
        {"event": "llm_eval", "update": 0, "rouge_l": 0.15, "target_perplexity": 90.0},
        {"event": "server_update", "update": 1, "distinct2": 0.8, "seconds": 10.0},
        {"event": "distilled", "update": 1, "clients": ["a"], "hashes": ["h1", "h2"], "labels": [0, 1]},
        {"event": "llm_eval", "update": 1, "rouge_l": 0.21, "target_perplexity": 70.0},
        {"event": "enhanced", "client": "a", "update": 1, "before": g(0.10), "after": g(0.16)},
        {"event": "perplexity", "stage": "start", "perplexity": 20.0},
        {"event": "perplexity", "stage": "end", "perplexity": 20.1},
        {"event": "client_eval", "client": "a", **g(0.18)},
        {"event": "client_eval", "client": "b", **g(0.22)},
        {"event": "run_end", "reason": "completed", "wall": 99.0},
    ])  # fmt: skip
    _write(tmp_path / "synthetic.jsonl", [  # two plausible pairs (distilled) and two nonsense ones
        {"input": "cats story 1", "target": "cats win", "label": "cats", "update": 1, "hash": "h1"},
        {"input": "dogs story 2", "target": "dogs win", "label": "dogs", "update": 1, "hash": "h2"},
        {"input": "cats story 3", "target": "zq xv", "label": "cats", "update": 1, "hash": "h3"},
        {"input": "dogs story 4", "target": "qq!", "label": "dogs", "update": 1, "hash": "h4"},
    ])  # fmt: skip
    r = cell_row(tmp_path, WriterJudge(model, tok, FMT, info["global_test"]["median_loglik"]))
    assert r["kind"] == "generation" and "slm_acc" not in r
    assert r["slm_rouge_l"] == pytest.approx(0.20) and r["slm_start_rouge_l"] == pytest.approx(0.15)
    assert r["slm_served_rouge_l"] == pytest.approx(0.18) and r["slm_local_rouge_l"] == pytest.approx(0.30)
    assert r["slm_reply_gain"] == pytest.approx(0.06) and r["slm_target_ppl"] == 50.0
    assert (r["llm_rouge_l"], r["llm_target_ppl"], r["llm_zero_shot"]) == (0.21, 70.0, 0.15)
    assert (
        r["judge_real_like_distilled"] >= 0.5
        and r["judge_real_like_last"] == r["judge_real_like_distilled"] / 2
    )
    assert r["judge_ppl_distilled"] < r["judge_ppl_last"]  # the nonsense pairs were not distilled
    assert r["ppl_change_pct"] == pytest.approx(0.5) and r["synthetic"] == 4


def test_generation_tables_and_targets():
    rows = []
    for seed, (c, s, k) in enumerate([(0.30, 0.25, 0.28), (0.32, 0.27, 0.32)]):
        common = {"task": "bbc-headlines", "seed": seed, "kind": "generation"}
        rows += [
            {**common, "method": "crosslm", "slm_rouge_l": c, "llm_rouge_l": 0.24, "ppl_change_pct": 0.4,
             "judge_real_like_distilled": 0.6},
            {**common, "method": "standalone", "slm_rouge_l": s},
            {**common, "method": "kd-no-feedback", "slm_rouge_l": k},
            {**common, "method": ZERO_SHOT, "llm_rouge_l": 0.17},
        ]  # fmt: skip
    exp = SimpleNamespace(
        name="g", methods=["crosslm", "standalone", "kd-no-feedback"], base_config="b", overrides={}
    )
    md = results_markdown(rows, exp, {"bbc-headlines, seed 0": {
        "model": "smollm2-135m-instruct", "train_size": 900, "epochs": 1,
        "global_test": {"target_perplexity": 40.0, "median_loglik": -3.2, "n": 200}}})  # fmt: skip
    assert "## SLM ROUGE-L F1 on the global test split (x100), final" in md
    assert "| crosslm | 31.0 ± 1.4 | 31.0 |" in md and "accuracy" not in md.split("## Where")[0].lower()
    assert "SLM ROUGE-L: CrossLM ≥ standalone + 3 points | 0.31 | 0.26 | +5.0 | met |" in md
    assert "SLM ROUGE-L: CrossLM ≥ KD without feedback + 1 point | 0.31 | 0.3 | +1.0 | met |" in md
    assert "LLM ROUGE-L: CrossLM ≥ zero-shot + 5 points | 0.24 | 0.17 | +7.0 | met |" in md
    assert "| kd-no-feedback | +1.0 ± 1.4 (n=2) | +1.0 |" in md  # paired by seed: +0.02 then +0.00
    assert (
        "## The writer judge" in md
        and "| bbc-headlines, seed 0 | smollm2-135m-instruct | 900 | 1 | 40.00 |" in md
    )
