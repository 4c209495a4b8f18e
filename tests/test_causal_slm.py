"""Causal SLMs on (input, target) pairs: the prompt format, the target-only loss and its weights, training,
the likelihood score, batched greedy decoding, and the generation metrics; on tiny random causal LMs."""

from __future__ import annotations

import math

import pytest
import torch

from crosslm.evaluation.generation import (
    distinct_2,
    evaluate_generation,
    rouge_l,
    rouge_l_scores,
    target_perplexity,
)
from crosslm.modeling.causal_slm import (
    PairFormat,
    encode_pairs,
    fit_pairs,
    greedy_generate,
    mean_target_loglik,
    pair_loss,
    prompt_text,
    target_logprobs,
)
from tests.conftest import make_llm, make_tokenizer

FMT = PairFormat(target_noun="headline", max_input_tokens=40, max_target_tokens=12)
INPUTS = ["shares rose", "a long story about the cup final and the goals", "rain", "new phone out today"]
TARGETS = ["up", "cup win", "wet day", "phone"]


@pytest.fixture
def tok():
    """The conftest character tokenizer, decoding without spaces between characters."""
    from tokenizers import decoders

    tok = make_tokenizer(chat=False)
    tok.backend_tokenizer.decoder = decoders.Fuse()
    return tok


def make_gpt2(vocab_size: int, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=256, pad_token_id=0, eos_token_id=1
    )
    return GPT2LMHeadModel(cfg).eval()


def full_nll(model, prompt: list[int], target: list[int]) -> float:
    """Mean NLL of `target` after `prompt`, from one unpadded forward over the whole sequence."""
    ids = torch.tensor([prompt + target])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    n = len(prompt)
    return -sum(float(logp[n - 1 + j, t]) for j, t in enumerate(target)) / len(target)


def test_prompt_format_and_budgets(tok) -> None:
    assert prompt_text("shares rose", "headline") == "shares rose\nHeadline:"
    [(p, t)] = encode_pairs(tok, ["abcdefghij" * 10], ["a headline that is far too long"], FMT)
    assert tok.decode(p) == "abcdefghij" * 4 + "\nHeadline:"  # input cut, marker kept
    assert len(t) == 12 and tok.eos_token_id not in t  # a cut target does not end
    [(p, t)] = encode_pairs(tok, ["x"], ["up"], FMT)
    assert tok.decode(p) == "x\nHeadline:" and t == tok(" up").input_ids + [tok.eos_token_id]
    with pytest.raises(ValueError, match="differ in length"):
        encode_pairs(tok, ["a"], [], FMT)
    with pytest.raises(ValueError, match="at least 1"):
        PairFormat(max_target_tokens=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_loss_is_the_target_tokens_nll_and_ignores_padding(tok, arch) -> None:
    model = make_llm(len(tok)) if arch == "llama" else make_gpt2(len(tok))
    pairs = encode_pairs(tok, INPUTS, TARGETS, FMT)
    expected = [full_nll(model, p, t) for p, t in pairs]
    with torch.no_grad():
        batched = pair_loss(model, tok, pairs)
        alone = [float(pair_loss(model, tok, [pair])) for pair in pairs]
    assert alone == pytest.approx(expected, abs=1e-4)  # prompt tokens carry no loss
    assert float(batched) == pytest.approx(sum(expected) / len(expected), abs=1e-4)  # padding neither
    ll = mean_target_loglik(model, tok, INPUTS, TARGETS, fmt=FMT, batch_size=3)
    assert ll.tolist() == pytest.approx([-e for e in expected], abs=1e-4)
    total, count = target_logprobs(model, tok, INPUTS, TARGETS, fmt=FMT, batch_size=2)
    assert count.tolist() == [len(t) for _, t in pairs]


def test_weights_scale_each_pairs_share_of_the_loss(tok, tiny_llm) -> None:
    pairs = encode_pairs(tok, INPUTS[:2], TARGETS[:2], FMT)
    with torch.no_grad():
        first = float(pair_loss(tiny_llm, tok, pairs[:1]))
        weighted = float(pair_loss(tiny_llm, tok, pairs, torch.tensor([2.0, 0.0])))
    assert weighted == pytest.approx(first, rel=1e-5)
    # and a zero weight gives that pair no gradient
    tiny_llm.zero_grad()
    pair_loss(tiny_llm, tok, pairs, torch.tensor([0.0, 1.0])).backward()
    g_mixed = [p.grad.clone() for p in tiny_llm.parameters()]
    tiny_llm.zero_grad()
    (pair_loss(tiny_llm, tok, pairs[1:]) / 2).backward()
    assert all(
        torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(g_mixed, tiny_llm.parameters(), strict=True)
    )


def test_training_learns_the_targets_is_seeded_and_weights_choose_what_is_learnt(tok) -> None:
    def trained(seed: int, weights=None):
        model = make_llm(len(tok), seed=1)
        fit_pairs(
            model, tok, INPUTS, TARGETS, lr=3e-3, batch_size=2, seed=seed, max_steps=40, fmt=FMT,
            sample_weights=weights,
        )  # fmt: skip
        return model

    before = mean_target_loglik(make_llm(len(tok), seed=1), tok, INPUTS, TARGETS, fmt=FMT)
    a, b, c = trained(0), trained(0), trained(1)
    after = mean_target_loglik(a, tok, INPUTS, TARGETS, fmt=FMT)
    assert (after > before + 1.0).all()  # every target became much more likely
    assert not a.training
    sa, sb, sc = (next(m.parameters()).detach() for m in (a, b, c))
    assert torch.equal(sa, sb) and not torch.equal(sa, sc)  # same seed, same model; other seed, other
    # a pair with weight 0 is not learnt (beyond what the others teach)
    w = trained(0, [4 / 3, 4 / 3, 4 / 3, 0.0])
    gain = mean_target_loglik(w, tok, INPUTS, TARGETS, fmt=FMT) - before
    assert gain[3] < 0.5 * gain[:3].min()
    with pytest.raises(ValueError, match="sample_weights"):
        fit_pairs(
            make_llm(len(tok)), tok, INPUTS, TARGETS, lr=1e-3, batch_size=2, seed=0, sample_weights=[1.0]
        )


def test_epochs_and_max_steps(tok, tiny_llm, monkeypatch) -> None:
    import crosslm.modeling.causal_slm as cs

    calls = []
    real = cs.pair_loss
    monkeypatch.setattr(cs, "pair_loss", lambda *a, **k: calls.append(len(a[2])) or real(*a, **k))
    fit_pairs(tiny_llm, tok, INPUTS, TARGETS, lr=1e-3, batch_size=3, seed=0, epochs=2, fmt=FMT)
    assert calls == [3, 1, 3, 1]
    calls.clear()
    fit_pairs(tiny_llm, tok, INPUTS, TARGETS, lr=1e-3, batch_size=3, seed=0, max_steps=5, fmt=FMT)
    assert calls == [3, 1, 3, 1, 3]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batched_greedy_decoding_matches_one_at_a_time(tok, arch) -> None:
    model = make_llm(len(tok), seed=3) if arch == "llama" else make_gpt2(len(tok), seed=3)
    batched = greedy_generate(model, tok, INPUTS, max_new_tokens=6, fmt=FMT, batch_size=4)
    alone = [greedy_generate(model, tok, [x], max_new_tokens=6, fmt=FMT)[0] for x in INPUTS]
    assert batched == alone
    assert all("\n" not in o and len(o) <= 6 for o in batched)


def test_greedy_output_is_cut_at_the_first_newline(tok) -> None:
    model = make_llm(len(tok), seed=2)
    fit_pairs(model, tok, ["ab"], ["cd\nef gh"], lr=5e-3, batch_size=1, seed=0, max_steps=60, fmt=FMT)
    assert greedy_generate(model, tok, ["ab"], max_new_tokens=10, fmt=FMT) == ["cd"]
    fit_pairs(model, tok, ["ab"], ["xy"], lr=5e-3, batch_size=1, seed=0, max_steps=60, fmt=FMT)
    assert greedy_generate(model, tok, ["ab"], max_new_tokens=10, fmt=FMT) == ["xy"]  # stops at eos


def test_rouge_l_and_distinct_2() -> None:
    scores = rouge_l_scores(["the cat sat", "", "x y"], ["the cat sat down", "a b", "x y"])
    assert scores[0] == pytest.approx(2 * 1.0 * 0.75 / 1.75) and scores[1] == 0.0 and scores[2] == 1.0
    assert rouge_l(["profits rising"], ["profit rises"]) == pytest.approx(1.0)  # Porter stemming
    assert math.isnan(rouge_l([], []))
    with pytest.raises(ValueError, match="differ in length"):
        rouge_l(["a"], [])
    assert distinct_2(["a b a b", "a b"]) == pytest.approx(2 / 4)
    assert distinct_2([]) == 0.0


def test_target_perplexity_pools_tokens_and_evaluate_generation(tok, tiny_llm) -> None:
    total, count = target_logprobs(tiny_llm, tok, INPUTS, TARGETS, fmt=FMT)
    ppl = target_perplexity(tiny_llm, tok, INPUTS, TARGETS, fmt=FMT)
    assert ppl == pytest.approx(math.exp(-float(total.sum()) / float(count.sum())), rel=1e-6)
    assert 1 < ppl < 3 * len(tok)  # a random model is near uniform over the vocabulary
    assert math.isnan(target_perplexity(tiny_llm, tok, [], [], fmt=FMT))
    out = evaluate_generation(tiny_llm, tok, INPUTS, TARGETS, max_new_tokens=4, fmt=FMT)
    assert set(out) == {"rouge_l", "target_perplexity", "distinct_2"}
    assert out["target_perplexity"] == pytest.approx(ppl, rel=1e-6)
    model = make_llm(len(tok), seed=4)
    fit_pairs(model, tok, INPUTS, TARGETS, lr=3e-3, batch_size=4, seed=0, max_steps=80, fmt=FMT)
    learnt = evaluate_generation(model, tok, INPUTS, TARGETS, max_new_tokens=10, fmt=FMT)
    assert learnt["rouge_l"] == pytest.approx(1.0) and learnt["target_perplexity"] < 0.05 * ppl
