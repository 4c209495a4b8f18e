"""Each randomised pass draws from its own seed: it neither depends on nor disturbs torch's global RNG.

Without this, a client's local training would depend on what the server ran before it, and the same
client, seed and data would train differently under CrossLM and under a baseline."""

from __future__ import annotations

import torch

from crosslm.config import GenerationConfig
from crosslm.seeding import own_rng
from tests.conftest import TOY_TASK as TASK
from tests.conftest import make_classifier


def test_own_rng_seeds_the_block_and_restores_the_state_after_it():
    torch.manual_seed(123)
    expected_after = torch.rand(3)
    torch.manual_seed(123)
    with own_rng(7):
        inside = torch.rand(3)
    assert torch.equal(torch.rand(3), expected_after)  # the outer sequence goes on as if untouched
    torch.manual_seed(999)
    with own_rng(7):
        assert torch.equal(torch.rand(3), inside)  # the block depends on its seed alone


def _train(tokenizer, global_seed: int) -> dict[str, torch.Tensor]:
    from crosslm.modeling.slm import fit

    model = make_classifier("bert", len(tokenizer))
    for m in model.modules():  # dropout on, so the global RNG would matter if fit drew from it
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.5
    texts = ["good film", "bad film", "great acting", "awful plot"] * 2
    targets = torch.nn.functional.one_hot(torch.tensor([1, 0, 1, 0] * 2), 2).float()
    torch.manual_seed(global_seed)
    fit(model, tokenizer, texts, targets, epochs=2, lr=1e-2, batch_size=4, max_length=16, seed=5)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_fit_depends_on_its_seed_not_on_the_global_rng(tiny_tokenizer):
    a, b = _train(tiny_tokenizer, 0), _train(tiny_tokenizer, 1)
    assert all(torch.equal(a[n], b[n]) for n in a)
    torch.manual_seed(42)
    untouched = torch.rand(2)
    _train(tiny_tokenizer, 42)
    assert torch.equal(torch.rand(2), untouched)  # fit consumed nothing from the global RNG


def test_generation_depends_on_its_seed_not_on_the_global_rng(tiny_tokenizer, tiny_llm):
    from crosslm.server.generate import generate_samples

    cfg = GenerationConfig(samples_per_label=3, batch_size=4, max_new_tokens=12, min_words=1)
    torch.manual_seed(0)
    untouched = torch.rand(2)
    torch.manual_seed(0)
    first, _ = generate_samples(tiny_llm, tiny_tokenizer, TASK, cfg, seen=set(), seed=1)
    assert torch.equal(torch.rand(2), untouched)
    torch.manual_seed(1)
    second, _ = generate_samples(tiny_llm, tiny_tokenizer, TASK, cfg, seen=set(), seed=1)
    assert first and [s.text for s in first] == [s.text for s in second]
