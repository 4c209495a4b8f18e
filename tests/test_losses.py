"""The CrossLM objective on a tiny random Llama with a real LoRA adapter."""

from __future__ import annotations

import pytest
import torch

from crosslm.config import LLMConfig
from crosslm.modeling.llm_text import (
    answer_ids,
    continuation_logprobs,
    next_token_logits,
    pair_batch,
    user_prompt_ids,
)
from crosslm.server.losses import (
    kd_targets,
    probability_regularizer,
    quality_guided_loss,
    sequence_terms,
    task_loss,
)
from crosslm.server.tune_llm import add_lora


def _lora(model):
    return add_lora(model, LLMConfig(lora_r=4, lora_alpha=8, lora_targets=["q_proj", "v_proj", "gate_proj"]))


def _batch(tok, pairs):
    return pair_batch(
        [user_prompt_ids(tok, p) for p, _ in pairs], [answer_ids(tok, x) for _, x in pairs], tok.pad_token_id
    )


def test_target_mask_covers_only_generated_tokens(tiny_tokenizer):
    b = _batch(tiny_tokenizer, [("write", "abc"), ("write a longer prompt", "xy")])
    # continuation = text tokens + eos
    assert b.target_mask.sum(-1).tolist() == [4, 3]
    # the masked positions predict exactly the continuation ids
    for i, (_p, x) in enumerate([("write", "abc"), ("write a longer prompt", "xy")]):
        predicted = b.targets[i][b.target_mask[i]].tolist()
        assert predicted == answer_ids(tiny_tokenizer, x)


def test_l_and_u_ignore_prompt_tokens():
    logp = torch.log(torch.tensor([[0.1, 0.2, 0.5, 0.5]]))
    mask = torch.tensor([[False, False, True, True]])
    l_seq, u_seq = sequence_terms(logp, mask)
    assert torch.allclose(l_seq, torch.log(torch.tensor([0.5])))
    assert torch.allclose(u_seq, -torch.log(torch.tensor([0.5])))


def test_qg_steps_raise_good_and_lower_poor_likelihood(tiny_tokenizer, tiny_llm):
    tok = tiny_tokenizer
    model = tiny_llm  # all weights trainable: the test is about the loss, not LoRA capacity
    good, poor = ("Write a review", "great film"), ("Write a review", "bad movie")
    batch = _batch(tok, [good, poor])
    q = torch.tensor([1.0, 0.0])

    def l_values():
        with torch.no_grad():
            l_seq, _ = sequence_terms(continuation_logprobs(model, batch), batch.target_mask)
        return l_seq

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    # Generated samples are likely under the model that wrote them: make both likely first.
    for _ in range(40):
        loss = -sequence_terms(continuation_logprobs(model, batch), batch.target_mask)[0].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    before = l_values()
    for _ in range(8):
        loss = quality_guided_loss(continuation_logprobs(model, batch), batch.target_mask, q, beta=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = l_values()
    assert after[0] > before[0] + 0.05, (before, after)  # q=1: more likely
    assert after[1] < before[1] - 0.05, (before, after)  # q=0: less likely


def test_hard_variant_thresholds_q():
    logp = torch.log(torch.full((2, 3), 0.5))
    mask = torch.ones(2, 3, dtype=torch.bool)
    soft = quality_guided_loss(logp, mask, torch.tensor([0.7, 0.7]), beta=0.5)
    hard = quality_guided_loss(logp, mask, torch.tensor([0.7, 0.7]), beta=0.5, hard=True, tau=0.6)
    # hard: both samples count as good -> pure -l = log 2
    assert torch.allclose(hard, torch.tensor(0.6931), atol=1e-3)
    assert not torch.allclose(soft, hard)


def test_probability_regularizer_zero_at_start_and_grows(tiny_tokenizer, tiny_llm):
    model = _lora(tiny_llm)
    batch = _batch(tiny_tokenizer, [("Write", "some text"), ("Write more", "x")])
    mask = batch.target_mask

    def kl():
        with torch.no_grad():
            logits = next_token_logits(model, batch)
            with model.disable_adapter():
                base = next_token_logits(model, batch)
        return float(probability_regularizer(logits, base, mask))

    assert kl() < 1e-10  # LoRA B starts at zero: p_theta == p_theta0
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.05 * torch.randn_like(p))
    first = kl()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.mul_(3.0)
    assert 0 < first < kl()


def test_pr_gradient_pulls_adapter_back(tiny_tokenizer, tiny_llm):
    model = _lora(tiny_llm)
    batch = _batch(tiny_tokenizer, [("Write", "some text")])
    mask = batch.target_mask
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.1 * torch.randn_like(p))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    values = []
    for _ in range(5):
        logits = next_token_logits(model, batch)
        with torch.no_grad(), model.disable_adapter():
            base = next_token_logits(model, batch)
        loss = probability_regularizer(logits, base, mask)
        values.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert values[-1] < values[0]


def test_kd_targets():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 0])
    t = kd_targets(y, logits, mu=0.3, temperature=2.0)
    assert torch.allclose(t.sum(-1), torch.ones(2))
    assert torch.equal(kd_targets(y, logits, mu=0.0, temperature=2.0), torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    assert torch.allclose(kd_targets(y, logits, mu=1.0, temperature=2.0), torch.softmax(logits / 2.0, -1))
    expected = 0.7 * torch.tensor([1.0, 0.0]) + 0.3 * torch.softmax(logits[1] / 2.0, -1)
    assert torch.allclose(t[1], expected)


def test_kd_loss_minimised_at_target():
    from crosslm.modeling.slm import soft_cross_entropy

    target = torch.tensor([[0.8, 0.2]])
    at_target = soft_cross_entropy(torch.log(target), target)
    elsewhere = soft_cross_entropy(torch.tensor([[0.0, 0.0]]), target)
    assert at_target < elsewhere
    onehot = torch.tensor([[0.0, 1.0]])
    logits = torch.tensor([[0.3, -1.2]])
    assert torch.allclose(
        soft_cross_entropy(logits, onehot), torch.nn.functional.cross_entropy(logits, torch.tensor([1]))
    )


def test_task_loss_prefers_correct_label():
    scores = torch.tensor([[-1.0, -5.0]])
    assert task_loss(scores, torch.tensor([0])) < task_loss(scores, torch.tensor([1]))


def test_gather_logprobs_matches_manual(tiny_tokenizer, tiny_llm):
    batch = _batch(tiny_tokenizer, [("ab", "cd"), ("a much longer prompt", "xyz")])
    lp = continuation_logprobs(tiny_llm, batch)
    for i, (p, x) in enumerate([("ab", "cd"), ("a much longer prompt", "xyz")]):
        seq = user_prompt_ids(tiny_tokenizer, p) + answer_ids(tiny_tokenizer, x)  # unpadded, alone
        with torch.no_grad():
            full = torch.log_softmax(tiny_llm(input_ids=torch.tensor([seq])).logits[0], -1)
        n = len(answer_ids(tiny_tokenizer, x))
        manual = torch.stack([full[len(seq) - n - 1 + j, seq[len(seq) - n + j]] for j in range(n)])
        assert torch.allclose(lp[i][batch.target_mask[i]], manual, atol=1e-4)  # padding changes nothing


def test_micro_batching_gives_the_same_update(tiny_tokenizer):
    """tune_adapter with gradient accumulation lands on the same adapter weights as one full batch."""
    import copy

    from crosslm.config import TuneConfig
    from crosslm.server.tune_llm import tune_adapter
    from tests.conftest import TOY_TASK as TASK
    from tests.conftest import make_llm

    generated = [("great film", 1, 0.9), ("bad", 0, 0.2), ("so so movie", 1, 0.5), ("awful acting", 0, 0.7)]
    good = [("great film", 1), ("awful acting", 0)]
    base = _lora(make_llm(len(tiny_tokenizer), seed=3))
    with torch.no_grad():  # a non-zero adapter so that L_PR has a gradient too
        for n, p in base.named_parameters():
            if "lora_B" in n:
                p.add_(0.02 * torch.randn_like(p))
    results = []
    for micro in (4, 1):
        model = copy.deepcopy(base)
        cfg = TuneConfig(
            steps=1, batch_size=4, micro_batch_size=micro, task_batch_size=2, lr=1e-2, autocast="float32"
        )
        losses = tune_adapter(
            model, tiny_tokenizer, TASK, generated, good, cfg, max_text_tokens=20, tau=0.6, seed=0
        )
        results.append((losses, {n: p.detach().clone() for n, p in model.named_parameters() if "lora" in n}))
    (l_full, w_full), (l_micro, w_micro) = results
    for k in ("qg", "pr", "task", "total"):
        assert abs(l_full[k] - l_micro[k]) < 1e-5, k
    assert all(torch.allclose(w_full[n], w_micro[n], atol=1e-6) for n in w_full)
    assert any(not torch.allclose(w_full[n], base.state_dict()[n]) for n in w_full)  # it did train


def test_bfloat16_autocast_tuning_trains_a_float32_adapter(tiny_tokenizer):
    """Under bfloat16 autocast the adapter, its gradients and AdamW stay float32; with B = 0 the adapter
    and the frozen reference agree exactly, so L_PR starts at 0; the losses track the float32 run."""
    import copy

    from crosslm.config import TuneConfig
    from crosslm.server.tune_llm import tune_adapter
    from tests.conftest import TOY_TASK as TASK
    from tests.conftest import make_llm

    generated = [("great film", 1, 0.9), ("bad", 0, 0.2), ("so so movie", 1, 0.5), ("awful acting", 0, 0.7)]
    good = [("great film", 1), ("awful acting", 0)]
    base = _lora(make_llm(len(tiny_tokenizer), seed=3))
    out = {}
    for dtype in ("float32", "bfloat16"):
        model = copy.deepcopy(base)
        cfg = TuneConfig(steps=1, batch_size=4, task_batch_size=2, lr=1e-2, autocast=dtype)
        losses = tune_adapter(
            model, tiny_tokenizer, TASK, generated, good, cfg, max_text_tokens=20, tau=0.6, seed=0
        )
        lora = {n: p for n, p in model.named_parameters() if "lora" in n}
        assert all(p.dtype == torch.float32 for p in lora.values())
        assert any(not torch.equal(p, base.state_dict()[n]) for n, p in lora.items())  # it trained
        out[dtype] = losses
    assert out["bfloat16"]["pr"] == 0.0  # B = 0 at the first step: adapter == reference, also in bfloat16
    for k in ("qg", "task"):
        assert abs(out["bfloat16"][k] - out["float32"][k]) < 0.05 * max(1.0, abs(out["float32"][k])), k


def test_fit_under_bfloat16_autocast_keeps_float32_weights_and_learns(tiny_tokenizer):
    from crosslm.modeling.slm import fit, predict_logits
    from tests.conftest import make_classifier

    model = make_classifier("bert", len(tiny_tokenizer))
    texts = ["good film", "bad film", "great acting", "awful plot"] * 4
    targets = torch.nn.functional.one_hot(torch.tensor([1, 0, 1, 0] * 4), 2).float()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fit(model, tiny_tokenizer, texts, targets, epochs=30, lr=5e-3, batch_size=8, max_length=16, seed=0,
        autocast="bfloat16")  # fmt: skip
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    preds = predict_logits(model, tiny_tokenizer, texts[:4], max_length=16).argmax(-1).tolist()
    assert preds == [1, 0, 1, 0]  # it fits four training texts


def test_logit_adjusted_local_training_pushes_a_label_the_client_does_not_hold_down_less(tiny_tokenizer):
    """The client's data holds labels 0 and 1 only. Plain cross-entropy drives p(label 2) toward 0 on
    every text it trains on; with logit adjustment the loss sees log prior(2) << 0, which already does
    that work, so the model's own (raw) logit for label 2 is pushed down far less."""
    from crosslm.modeling.slm import predict_logits, train_supervised
    from crosslm.task import LabelledTexts
    from tests.conftest import make_classifier

    local = LabelledTexts(["good film", "bad film", "great acting", "awful plot"] * 5, [1, 0, 1, 0] * 5)
    kw = {"epochs": 30, "lr": 5e-3, "batch_size": 8, "max_length": 16, "seed": 0}
    label2 = {}
    for t in (0.0, 1.0):
        model = make_classifier("bert", len(tiny_tokenizer), num_labels=3)
        train_supervised(model, tiny_tokenizer, local, 3, logit_adjust=t, **kw)
        logits = predict_logits(model, tiny_tokenizer, local.texts[:4], max_length=16)
        assert logits[:, :2].argmax(-1).tolist() == [1, 0, 1, 0]  # both learn the local task
        label2[t] = torch.softmax(logits, -1)[:, 2].mean().item()
    assert label2[1.0] > 2 * label2[0.0], label2  # 0.072 vs 0.028 when written


def test_adding_lora_prints_no_deprecation_warning(tiny_llm):
    """peft reads transformers' deprecated `is_gradient_checkpointing` alias; a user's run shows no warning
    for it, and the adapter is still attached."""
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        model = _lora(tiny_llm)
    assert not [w for w in seen if issubclass(w.category, FutureWarning)], [str(w.message) for w in seen]
    assert any("lora_" in n for n, _ in model.named_parameters())


def test_centred_weights_raise_only_above_the_labels_mean_and_push_down_only_another_labels_texts():
    from crosslm.server.losses import qg_weights

    q = torch.tensor([0.9, 0.5, 0.4, 0.2, 0.6])
    labels = torch.tensor([0, 0, 0, 1, 1])
    other = torch.tensor([0.1, 0.5, 0.6, 0.8, 0.4])  # the SLMs' best other label
    up, down = qg_weights(q, labels, other, form="centred", tau=0.6)
    assert up.tolist() == pytest.approx([0.9 - 0.6, 0.0, 0.0, 0.0, 0.2])  # label means 0.6 and 0.4
    assert down.tolist() == [0.0, 0.0, 1.0, 1.0, 0.0]  # only texts read as another label with p >= tau
    up_q, down_q = qg_weights(q, labels, other, form="q", tau=0.6)
    assert torch.equal(up_q, q) and torch.allclose(down_q, 1 - q)
    up_h, _ = qg_weights(q, labels, other, form="q", tau=0.6, hard=True)
    assert up_h.tolist() == [1.0, 0.0, 0.0, 0.0, 1.0]
