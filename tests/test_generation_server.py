"""The server's steps of a generation update (crosslm.server.generation_update) on tiny random causal LMs:
story cleaning, the two-step pair generation and its drop counts, the per-client rank score and q, S+ per condition, L_task for
generation and the tuning step, token-level distillation, the LLM's own targets, and one update end to end."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from crosslm.config import DistillConfig, GenerationConfig, LLMConfig, RunConfig, TuneConfig
from crosslm.evaluation.generation import rouge_l
from crosslm.modeling.causal_slm import PairFormat, encode_pairs, mean_target_loglik
from crosslm.modeling.llm_text import answer_ids, next_token_logits, pair_batch, user_prompt_ids
from crosslm.server import generation_update as gu
from crosslm.server.feedback import ClientModel, staleness_weights
from crosslm.server.generation_update import (
    clean_story,
    distil_pairs,
    generate_pairs,
    generation_task_loss,
    generation_update,
    kd_mismatch,
    llm_targets,
    percentile_ranks,
    score_pairs,
    select_pairs,
    teacher_targets,
    token_kd_loss,
    tune_generation_adapter,
)
from crosslm.server.tune_llm import add_lora
from crosslm.task import TaskSpec
from tests.conftest import make_tokenizer

TASK = TaskSpec(
    name="tiny-news",
    labels=("sport", "tech"),
    descriptions=("sport", "technology"),
    verbalizer=("Sport", "Tech"),
    generation_prompt="Write a {description} story.",
    classification_prompt="",
    text_noun="story",
    kind="generation",
    target_noun="headline",
)
FMT = PairFormat(target_noun="headline", max_input_tokens=60, max_target_tokens=16)
STORIES = {  # what the tiny LLM is taught to write for each condition: (story, headline)
    0: [
        ("the home team won the cup final again", "cup win"),
        ("a late goal gave the club the title", "late title"),
    ],
    1: [
        ("a new phone came out with a big screen", "new phone"),
        ("the chip maker built a faster chip", "fast chip"),
    ],
}


def clean(answer: str, truncated: bool = False, max_chars: int = 0) -> str:
    return clean_story(answer, TASK, truncated=truncated, min_words=3, max_chars=max_chars)


@pytest.fixture(scope="module")
def tok():
    """The conftest chat tokenizer, decoding characters without spaces between them."""
    from tokenizers import decoders

    tok = make_tokenizer(chat=True)
    tok.backend_tokenizer.decoder = decoders.Fuse()
    return tok


def tiny_causal(vocab_size: int, layers: int = 2, seed: int = 0, hidden: int = 32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, pad_token_id=0, eos_token_id=1, bos_token_id=1)  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def writer_llm(tok):
    """A tiny LLM taught to answer each condition's prompt with one of its STORIES, and the target prompt
    of each story with its headline."""
    model = tiny_causal(len(tok), hidden=64, seed=1)
    prompts, answers = [], []
    for c, pairs in STORIES.items():
        for story, headline in pairs:
            prompts += [user_prompt_ids(tok, TASK.prompt_for(c)), gu.target_prompt_ids(tok, TASK, story, 100)]
            answers += [answer_ids(tok, story), answer_ids(tok, headline)]
    batch = pair_batch(prompts, answers, tok.pad_token_id)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(150):
        logits = next_token_logits(model, batch)
        logp = torch.log_softmax(logits, -1).gather(-1, batch.targets.unsqueeze(-1)).squeeze(-1)
        loss = -(logp * batch.target_mask).sum() / batch.target_mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.1, "the tiny LLM did not learn its answers"
    return add_lora(model.eval(), LLMConfig(lora_r=4, lora_alpha=8, lora_targets=["q_proj", "v_proj"]))


# -- 1. pairs ---------------------------------------------------------------------------------------------


def test_a_story_is_cleaned_like_a_real_input() -> None:
    assert clean("the team won the cup final") == "the team won the cup final"
    # a preamble, a 'Story:' marker, markdown, quotes and spread-out whitespace
    assert clean('Sure, here it is:\n**Story:** "the  team\nwon the cup"') == "the team won the cup"
    # a headline the LLM wrote anyway is not part of the input
    assert clean("Story: the team won the cup\nHeadline: Cup win") == "the team won the cup"
    # an unfinished last sentence is cut when the budget ran out; the input is cut at a word to max_chars
    assert (
        clean("The team won. The fans went home. They sang all", truncated=True)
        == "The team won. The fans went home."
    )
    assert clean("the team won the cup final again", max_chars=20) == "the team won the cup"
    # too short (under min_words) gives ''
    assert clean("Story: cup won") == "" and clean("Headline: Cup win") == ""


def test_generation_counts_every_drop_by_reason_and_dedupes_across_updates(tok, monkeypatch) -> None:
    stories = {  # per condition, what the LLM "writes" for P(c) (sampling replaced; cleaning and counting real)
        0: ["the team won the cup", "the team won the cup", "cup won", "the fans sang all night"],
        1: ["a new phone came out", "another phone came out", "chips got faster today", "a robot can cook now"],
    }  # fmt: skip
    headlines = {  # ... and for the target prompt of each story: (answer, finished)
        "the team won the cup": ("Cup win", True), "a new phone came out": ("New phone", True),
        "another phone came out": ("New phone", True),  # a repeated headline
        "chips got faster today": ("", True), "a robot can cook now": ("Robot c", False),  # cut by the budget
        "the fans sang all night": ("A very long headline here", True),
    }  # fmt: skip
    prompts = {c: user_prompt_ids(tok, TASK.prompt_for(c)) for c in (0, 1)}

    def fake_stories(snapshot, tokenizer, rows, cfg, *, desc):
        out, used = [], dict.fromkeys(prompts, 0)
        for p in rows:
            c = next(c for c, q in prompts.items() if q == p)
            out.append(tok(stories[c][used[c]], add_special_tokens=False).input_ids + [tok.eos_token_id])
            used[c] += 1
        return out

    def fake_targets(snapshot, tokenizer, task, inputs, **kw):
        return [headlines[x] for x in inputs]

    monkeypatch.setattr(gu, "sample_answers", fake_stories)
    monkeypatch.setattr(gu, "write_targets", fake_targets)
    cfg = GenerationConfig(samples_per_label=4, min_words=3, dtype="float32")
    seen: set[str] = set()
    model = tiny_causal(len(tok))
    kw = {"max_input_chars": 300, "max_target_chars": 20, "max_target_tokens": 16, "max_text_tokens": 100}
    pairs, stats = generate_pairs(model, tok, TASK, cfg, seen=seen, seed=0, **kw)
    assert [(p.input, p.target, p.condition) for p in pairs] == [
        ("the team won the cup", "Cup win", 0),
        ("a new phone came out", "New phone", 1),
    ]
    assert stats.generated == 8 and stats.kept == 2
    # duplicates: a repeated story, and a new story under a repeated headline
    assert stats.dropped == {"too_short": 1, "empty_target": 1, "truncated": 1, "target_too_long": 1,
                             "duplicate": 2}  # fmt: skip
    assert len(seen) == 4  # each kept pair's input and target
    # a later update that writes the same stories: every pair is a duplicate of the earlier one's
    again, stats2 = generate_pairs(model, tok, TASK, cfg, seen=seen, seed=1, **kw)
    assert again == [] and stats2.dropped["duplicate"] == 4 and stats2.dropped["too_short"] == 1


def test_the_input_prompt_asks_for_the_input_and_the_target_prompt_for_its_target() -> None:
    assert TASK.prompt_for(1) == "Write a technology story."
    assert TASK.target_prompt("the story") == "Write the headline for this story:\nthe story"


# -- 2. the score -----------------------------------------------------------------------------------------


def _client(cid: str, n: int, base_version: int = 0) -> ClientModel:
    return ClientModel(cid, "tiny", None, None, n, [n // 2, n - n // 2], base_version, 1)


def test_percentile_ranks_ignore_a_clients_offset_and_scale() -> None:
    s = torch.tensor([-3.0, -1.0, -2.0, -1.0, -5.0])
    r = percentile_ranks(s)
    assert r.tolist() == [0.25, 0.875, 0.5, 0.875, 0.0]  # ties share their mid-rank
    assert torch.equal(percentile_ranks(s - 4.5), r) and torch.equal(percentile_ranks(3 * s), r)
    by_group = percentile_ranks(s, [0, 0, 1, 1, 1])
    assert by_group.tolist() == [0.0, 1.0, 0.5, 1.0, 0.0]
    assert percentile_ranks(torch.tensor([2.0])).tolist() == [0.5]


def test_clients_whose_scores_differ_by_a_constant_score_alike_and_q_follows_the_weights(monkeypatch) -> None:
    base = torch.tensor([-2.0, -1.0, -3.0, -0.5, -4.0, -2.5])
    raw = {
        "deep": base,
        "shallow": base - 3.0,
        "contrary": -base,
    }  # the shallow SLM finds every target harder
    monkeypatch.setattr(gu, "mean_target_loglik", lambda model, tokenizer, x, y, **kw: raw[model])
    models = [ClientModel(c, "tiny", c, None, 10, [5, 5], 0, 1) for c in ("deep", "shallow")]
    inputs, targets, conds = ["x"] * 6, ["y"] * 6, [0, 0, 0, 1, 1, 1]
    fb = score_pairs(inputs, targets, conds, models, {"deep": 0.7, "shallow": 0.3}, fmt=FMT)
    assert torch.equal(fb.ranks["deep"], fb.ranks["shallow"])
    assert torch.allclose(fb.q, fb.ranks["deep"])  # two clients that agree: q is their common rank
    assert fb.q.tolist() == [0.5, 1.0, 0.0, 1.0, 0.0, 0.5]  # ranked within each condition
    assert float(fb.q.min()) >= 0 and float(fb.q.max()) <= 1
    # two clients that disagree: q leans toward the one with more data, and away from a stale one
    a, b = _client("deep", 30), _client("contrary", 10)
    for m in (a, b):
        m.model = m.client_id
    w = staleness_weights([a, b], 0, 0.5)
    assert w == pytest.approx({"deep": 0.75, "contrary": 0.25})
    fb = score_pairs(inputs, targets, conds, [a, b], w, fmt=FMT, within_condition=False)
    assert torch.allclose(fb.q, 0.75 * fb.ranks["deep"] + 0.25 * fb.ranks["contrary"])
    assert int(fb.q.argmax()) == int(base.argmax())
    b.base_version = 3  # at update 3, a's weights are 3 updates old and b's current
    stale = staleness_weights([a, b], 3, 0.5)
    assert stale["deep"] < stale["contrary"]  # 30 * 0.125 < 10
    fb = score_pairs(inputs, targets, conds, [a, b], stale, fmt=FMT, within_condition=False)
    assert int(fb.q.argmax()) == int((-base).argmax())


def test_the_score_of_real_tiny_slms_is_a_q_in_0_1(tok) -> None:
    models = [ClientModel(f"c{k}", "tiny", tiny_causal(len(tok), layers=k, seed=k), tok, 10, [5, 5], 0, 1)
              for k in (1, 2)]  # fmt: skip
    inputs = ["the team won the cup", "a new phone", "rain all day", "chips got faster"]
    targets = ["cup win", "phone", "wet", "fast chip"]
    fb = score_pairs(inputs, targets, [0, 1, 0, 1], models, {"c1": 0.5, "c2": 0.5}, fmt=FMT)
    assert fb.q.shape == (4,) and bool(((fb.q >= 0) & (fb.q <= 1)).all())
    for m in models:  # each client's raw score is its mean target log-likelihood
        assert torch.allclose(
            fb.loglik[m.client_id], mean_target_loglik(m.model, tok, inputs, targets, fmt=FMT)
        )


def test_splus_is_per_condition_above_tau_highest_first_and_capped() -> None:
    q = torch.tensor([0.9, 0.2, 0.6, 0.95, 0.5, 0.7, 0.8, 0.4])
    conds = [0, 0, 0, 1, 1, 1, 0, 2]
    assert select_pairs(conds, q, num_conditions=3, tau=0.5, max_per_condition=10) == [
        [0, 6, 2],
        [3, 5, 4],
        [],
    ]
    assert select_pairs(conds, q, num_conditions=3, tau=0.5, max_per_condition=2) == [[0, 6], [3, 5], []]


# -- 3. tuning the LLM ------------------------------------------------------------------------------------


def test_l_task_for_generation_scores_only_the_target_tokens(tok) -> None:
    """Against one unpadded forward per pair: the loss is the target tokens' mean NLL, whatever the prompt
    tokens' own predictions are (and the padding of the shorter row changes nothing)."""
    model = tiny_causal(len(tok), seed=3)
    inputs, targets = ["the team won the cup final", "rain"], ["Cup win", "Wet day ahead"]
    with torch.no_grad():
        loss = generation_task_loss(model, tok, TASK, inputs, targets, max_text_tokens=100)
    per_pair, all_tokens = [], []
    for x, y in zip(inputs, targets, strict=True):
        prompt, answer = gu.target_prompt_ids(tok, TASK, x, 100), answer_ids(tok, y)
        ids = torch.tensor([prompt + answer])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        nll = [-float(logp[t - 1, ids[0, t]]) for t in range(1, ids.shape[1])]
        per_pair.append(sum(nll[len(prompt) - 1 :]) / len(answer))
        all_tokens.append(sum(nll) / len(nll))
    assert float(loss) == pytest.approx(sum(per_pair) / 2, abs=1e-4)
    assert abs(float(loss) - sum(all_tokens) / 2) > 1e-3  # the prompt's tokens would change it


def test_the_generation_tuning_step_lowers_l_task(tok) -> None:
    model = add_lora(tiny_causal(len(tok), seed=4), LLMConfig(lora_r=4, lora_alpha=8))
    good = [(s, h) for pairs in STORIES.values() for s, h in pairs]
    generated = [
        (s, h, c, q) for c, pairs in STORIES.items() for (s, h), q in zip(pairs, (0.9, 0.2), strict=True)
    ]
    x, y = [s for s, _ in good], [h for _, h in good]
    with torch.no_grad():
        before = float(generation_task_loss(model, tok, TASK, x, y, max_text_tokens=100))
    cfg = TuneConfig(steps=12, batch_size=4, task_batch_size=4, lr=3e-2, autocast="float32")
    losses = tune_generation_adapter(
        model, tok, TASK, generated, good, cfg, max_text_tokens=100, tau=0.5, seed=0
    )
    with torch.no_grad():
        after = float(generation_task_loss(model, tok, TASK, x, y, max_text_tokens=100))
    assert after < before - 0.1
    assert set(losses) == {"total", "qg", "task", "pr"} and all(math.isfinite(v) for v in losses.values())
    assert losses["task"] > 0 and losses["pr"] >= 0
    none = tune_generation_adapter(model, tok, TASK, [], good, cfg, max_text_tokens=100, tau=0.5, seed=0)
    assert none["total"] == 0.0


# -- 4. distillation --------------------------------------------------------------------------------------

PAIRS_X = ["the team won the cup", "a new phone came out", "rain all day long"]
PAIRS_Y = ["cup win", "new phone", "wet day"]


def _kd(student, teacher, tok, temperature: float = 2.0) -> torch.Tensor:
    encoded = encode_pairs(tok, PAIRS_X, PAIRS_Y, FMT)
    tt = teacher_targets(teacher, encoded, tok.pad_token_id, temperature=temperature, top_k=8)
    batch = pair_batch([p for p, _ in encoded], [t for _, t in encoded], tok.pad_token_id)
    ids, probs = tt.batch(list(range(len(encoded))), batch.keep, None)
    return token_kd_loss(next_token_logits(student, batch), batch.target_mask, ids, probs, temperature)


def test_token_kd_is_zero_for_the_teacher_itself_and_positive_otherwise(tok) -> None:
    teacher = tiny_causal(len(tok), seed=5)
    same = copy.deepcopy(teacher)
    kl = _kd(same, teacher, tok)
    assert kl.shape == (3,) and float(kl.detach().abs().max()) < 1e-5
    kl.sum().backward()  # the teacher is a minimum: no gradient pushes the student away from it
    assert max(float(p.grad.abs().max()) for p in same.parameters() if p.grad is not None) < 1e-4
    other = _kd(tiny_causal(len(tok), seed=6), teacher, tok)
    assert bool((other > 1e-4).all())  # random tiny models are near uniform: small, yet 100x the above


def test_distillation_moves_the_slm_toward_the_llm_and_skips_kd_across_vocabularies(tok) -> None:
    teacher = tiny_causal(len(tok), seed=5)
    cfg = DistillConfig(steps=15, lr=1e-2, batch_size=3, mu=1.0, temperature=1.0, autocast="float32")
    student = tiny_causal(len(tok), layers=1, seed=7)
    with torch.no_grad():
        before = float(_kd(student, teacher, tok, 1.0).mean())
    weights = torch.ones(3)
    _, report = distil_pairs(student, tok, PAIRS_X, PAIRS_Y, weights, cfg, fmt=FMT, seed=0, teacher=teacher,
                             teacher_tokenizer=tok, top_k=8)  # fmt: skip
    with torch.no_grad():
        after = float(_kd(student, teacher, tok, 1.0).mean())
    assert report.token_kd and report.skipped_reason == "" and report.pairs == 3
    assert after < 0.5 * before
    # a teacher whose tokenizer has one more token: no token-level KD, sequence-level only, with a reason
    other_tok = make_tokenizer(chat=True)
    other_tok.add_tokens(["<extra>"])
    big_teacher = tiny_causal(len(other_tok), seed=5)
    assert "vocabularies differ in size" in kd_mismatch(big_teacher, other_tok, student, tok)
    assert "output layers differ" in kd_mismatch(big_teacher, tok, student, tok)
    assert kd_mismatch(teacher, tok, student, tok) == ""
    student2 = tiny_causal(len(tok), layers=1, seed=7)
    start = {n: p.detach().clone() for n, p in student2.named_parameters()}
    _, report = distil_pairs(student2, tok, PAIRS_X, PAIRS_Y, weights, cfg, fmt=FMT, seed=0, teacher=big_teacher,
                             teacher_tokenizer=other_tok)  # fmt: skip
    assert not report.token_kd and "vocabularies differ" in report.skipped_reason
    assert any(not torch.equal(p, start[n]) for n, p in student2.named_parameters())  # it still trained


# -- 5. the LLM's own targets and one update end to end ----------------------------------------------------


def test_the_llm_writes_targets_for_evaluation(tok, writer_llm) -> None:
    stories = [s for pairs in STORIES.values() for s, _ in pairs]
    headlines = [h for pairs in STORIES.values() for _, h in pairs]
    out = llm_targets(writer_llm, tok, TASK, stories, max_new_tokens=16, max_text_tokens=100, batch_size=3)
    assert out == headlines and rouge_l(out, headlines) == 1.0
    ppl = gu.llm_target_perplexity(writer_llm, tok, TASK, stories, headlines, max_text_tokens=100)
    assert 1.0 <= ppl < 1.5


def test_one_generation_update_runs_its_steps_in_sequence(tok, writer_llm) -> None:
    llm = copy.deepcopy(writer_llm)
    cfg = RunConfig()
    cfg.generation = GenerationConfig(samples_per_label=4, batch_size=8, max_new_tokens=80, min_words=3,
                                      temperature=0.7, dtype="float32")  # fmt: skip
    cfg.tune = TuneConfig(steps=2, batch_size=4, task_batch_size=2, lr=1e-3, autocast="float32")
    cfg.distill = DistillConfig(steps=3, batch_size=4, lr=1e-3, mu=0.5, temperature=2.0, autocast="float32")
    cfg.clients.max_length = 60
    cfg.generation_task.max_target_tokens = 16
    slms = {f"c{k}": tiny_causal(len(tok), layers=k, seed=10 + k) for k in (1, 2)}
    models = {cid: ClientModel(cid, "tiny", m, tok, 10 * (i + 1), [5, 5], 0, 1)
              for i, (cid, m) in enumerate(slms.items())}  # fmt: skip
    uploaded = {cid: copy.deepcopy(m.state_dict()) for cid, m in slms.items()}
    adapter = {n: p.detach().clone() for n, p in llm.named_parameters() if p.requires_grad}
    pool: list[gu.SyntheticPair] = []
    seen: set[str] = set()
    out = generation_update(llm, tok, TASK, cfg, models, ["c1", "c2"], pool=pool, seen=seen, u=1)

    assert out.stats.generated == 8 and out.stats.kept == len(pool) == len(out.new) >= 2
    assert out.stats.kept + sum(out.stats.dropped.values()) == 8
    known = {(s, h) for pairs in STORIES.values() for s, h in pairs}
    assert all((p.input, p.target) in known for p in pool)  # what the LLM was taught, in two steps
    assert all((p.update, p.llm_version) == (1, 0) for p in pool)
    assert out.feedback is not None and bool(((out.feedback.q >= 0) & (out.feedback.q <= 1)).all())
    assert (
        set(out.feedback.weights) == {"c1", "c2"} and out.feedback.weights["c2"] > out.feedback.weights["c1"]
    )
    for c, idx in enumerate(out.good):
        assert all(pool[i].condition == c and float(out.feedback.q[i]) >= 0.5 for i in idx)
        assert [float(out.feedback.q[i]) for i in idx] == sorted(
            (float(out.feedback.q[i]) for i in idx), reverse=True
        )
    assert any(out.good)
    assert out.losses["task"] > 0 and all(math.isfinite(v) for v in out.losses.values())
    assert any(not torch.equal(p, adapter[n]) for n, p in llm.named_parameters() if n in adapter)  # tuned
    for cid, student in out.students.items():
        assert out.distilled[cid].token_kd and out.distilled[cid].pairs == sum(len(g) for g in out.good)
        assert any(not torch.equal(p, uploaded[cid][n]) for n, p in student.state_dict().items())
        assert all(
            torch.equal(p, uploaded[cid][n]) for n, p in slms[cid].state_dict().items()
        )  # registry kept
    # the next update's answers repeat this one's: they are dropped as duplicates
    again = generation_update(llm, tok, TASK, cfg, models, ["c1"], pool=pool, seen=seen, u=2)
    assert again.stats.dropped["duplicate"] > 0 and len(pool) == out.stats.kept + again.stats.kept
