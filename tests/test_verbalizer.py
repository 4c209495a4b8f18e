"""The LLM as a classifier: whole label strings scored in the assistant turn, plus calibration."""

from __future__ import annotations

import torch

from crosslm.modeling.llm_text import answer_ids, user_prompt_ids
from crosslm.server.verbalizer import calibrated, evaluate_llm, label_scores
from crosslm.task import LabelledTexts
from tests.conftest import TOY_TASK

TASK = TOY_TASK


def test_label_scores_sum_whole_label_string(tiny_tokenizer, tiny_llm):
    texts = ["good film", "a very bad and long movie"]
    with torch.no_grad():
        scores = label_scores(tiny_llm, tiny_tokenizer, TASK, texts, batch_size=3)
    assert scores.shape == (2, 2)
    for i, text in enumerate(texts):
        prompt = user_prompt_ids(tiny_tokenizer, TASK.classify_prompt(text))
        for c, word in enumerate(TASK.verbalizer):
            ans = answer_ids(tiny_tokenizer, word)
            ids = torch.tensor([prompt + ans])
            with torch.no_grad():
                logp = torch.log_softmax(tiny_llm(input_ids=ids).logits[0].float(), -1)
            manual = sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(ans))
            assert abs(manual - float(scores[i, c])) < 1e-3


def test_calibration_removes_label_word_bias():
    # The model prefers "Negative" regardless of content.
    scores = torch.log(torch.tensor([[0.8, 0.2], [0.6, 0.4]]))
    cf = torch.log(torch.tensor([[0.7, 0.3], [0.7, 0.3]]))
    assert scores.argmax(-1).tolist() == [0, 0]
    assert calibrated(scores, cf).argmax(-1).tolist() == [0, 1]


def test_evaluate_llm_reports_raw_and_calibrated(tiny_tokenizer, tiny_llm):
    data = LabelledTexts(["good", "bad", "fine", "awful"], [1, 0, 1, 0])
    m = evaluate_llm(tiny_llm, tiny_tokenizer, TASK, data, max_text_tokens=20, batch_size=4)
    assert set(m) == {"raw_accuracy", "raw_macro_f1", "calibrated_accuracy", "calibrated_macro_f1", "n"}
    assert m["n"] == 4
    assert all(0.0 <= m[k] <= 1.0 for k in m if k != "n")


def test_label_word_forms_in_one_pass_equal_separate_evaluations(tiny_tokenizer, tiny_llm):
    import dataclasses

    data = LabelledTexts(["good", "bad", "fine", "awful", "great", "poor"], [1, 0, 1, 0, 1, 0])
    kw = {"max_text_tokens": 20, "batch_size": 4}
    lower = [v.lower() for v in TASK.verbalizer]
    both = evaluate_llm(tiny_llm, tiny_tokenizer, TASK, data, other_verbalizers={"lowercase": lower}, **kw)
    alone = evaluate_llm(tiny_llm, tiny_tokenizer, TASK, data, **kw)
    lowered = evaluate_llm(
        tiny_llm, tiny_tokenizer, dataclasses.replace(TASK, verbalizer=tuple(lower)), data, **kw
    )
    assert {k: both[k] for k in alone} == alone
    assert both["label_word_variants"]["lowercase"] == lowered


def test_label_score_gradients_match_one_sequence_per_pair(tiny_tokenizer, tiny_llm):
    """L_task backpropagates through the shared prompt cache exactly as through separate sequences."""
    from crosslm.modeling.llm_text import continuation_logprobs, pair_batch

    texts, y = ["ok", "a much longer review text here", "meh"], torch.tensor([0, 1, 1])
    prompts = [user_prompt_ids(tiny_tokenizer, TASK.classify_prompt(t)) for t in texts]
    answers = [answer_ids(tiny_tokenizer, v) for v in TASK.verbalizer]
    batch = pair_batch([p for p in prompts for _ in answers], [a for _ in prompts for a in answers], 0)
    full = (continuation_logprobs(tiny_llm, batch) * batch.target_mask).sum(-1).view(3, 2)
    torch.nn.functional.cross_entropy(full, y).backward()
    expected = {n: p.grad.clone() for n, p in tiny_llm.named_parameters()}
    tiny_llm.zero_grad()
    shared = label_scores(tiny_llm, tiny_tokenizer, TASK, texts, batch_size=2)
    assert torch.allclose(full.detach(), shared.detach(), atol=1e-4)
    torch.nn.functional.cross_entropy(shared, y).backward()
    for n, p in tiny_llm.named_parameters():
        assert torch.allclose(expected[n], p.grad, atol=1e-5), n
