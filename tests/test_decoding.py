"""The fast sampling path: same nucleus as Hugging Face top-p, the same distribution, the same greedy tokens
as `model.generate`, the LoRA update carried into the snapshot, and the single-token attention path."""

from __future__ import annotations

import pytest
import torch

from crosslm.modeling.llm_text import pair_batch
from crosslm.server.decoding import (
    SnapshotCache,
    decode_attention,
    generation_model,
    nucleus_mask,
    sample_tokens,
    sample_top_p,
)


def test_nucleus_matches_transformers_top_p():
    from transformers.generation.logits_process import TopPLogitsWarper

    torch.manual_seed(0)
    for scale in (0.5, 3.0, 8.0):
        logits = torch.randn(16, 500) * scale
        hf_kept = TopPLogitsWarper(0.9)(None, logits.clone()) > float("-inf")
        assert torch.equal(nucleus_mask(torch.softmax(logits, -1), 0.9), hf_kept)


def test_rejection_sampler_draws_the_renormalised_nucleus():
    probs = torch.tensor([[0.40, 0.25, 0.15, 0.10, 0.05, 0.03, 0.02]])
    keep = nucleus_mask(probs, 0.78)
    assert keep.tolist() == [[True, True, True, False, False, False, False]]
    n = 30_000
    gen = torch.Generator().manual_seed(1)
    draws = sample_top_p(probs.expand(n, -1).contiguous(), 0.78, generator=gen)
    counts = torch.bincount(draws, minlength=7).double()
    assert counts[3:].sum() == 0  # nothing outside the nucleus
    expected = probs[0, :3].double() / probs[0, :3].sum() * n
    chi2 = ((counts[:3] - expected) ** 2 / expected).sum()
    p_value = torch.special.gammaincc(torch.tensor(1.0, dtype=torch.float64), chi2 / 2)  # df = 2
    assert p_value > 1e-3, (counts, expected)


def test_rejection_sampler_takes_exactly_the_draws_of_the_full_check():
    """The shortcut (accept when the rest of the row is under top_p) changes no decision."""

    def full_check(probs, top_p, generator):
        out, rows = torch.empty(probs.shape[0], dtype=torch.long), torch.arange(probs.shape[0])
        while rows.numel():
            p = probs[rows]
            cdf = p.cumsum(-1)
            u = torch.rand(rows.numel(), 1, generator=generator) * cdf[:, -1:]
            tok = torch.searchsorted(cdf, u, right=True).clamp_(max=p.shape[1] - 1)
            ok = (p * (p > p.gather(-1, tok))).sum(-1) < top_p
            out[rows[ok]] = tok[ok, 0]
            rows = rows[~ok]
        return out

    torch.manual_seed(0)
    for temperature in (0.3, 1.0, 3.0):  # peaked rows take the shortcut, flat ones the full check
        probs = torch.softmax(torch.randn(256, 500) / temperature, -1)
        for top_p in (0.5, 0.9, 0.95):
            want = full_check(probs, top_p, torch.Generator().manual_seed(7))
            got = sample_top_p(probs, top_p, torch.Generator().manual_seed(7))
            assert torch.equal(got, want)


def test_top_p_one_keeps_the_whole_vocabulary():
    probs = torch.softmax(torch.randn(4, 50), -1)
    assert nucleus_mask(probs, 1.0).all()
    assert sample_top_p(probs, 1.0).shape == (4,)


def _generate_greedy(model, prompts, pad_id, eos_id, max_new):
    batch = pair_batch([[] for _ in prompts], prompts, pad_id)
    out = model.generate(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        do_sample=False,
        max_new_tokens=max_new,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
    )[:, batch.input_ids.shape[1] :].tolist()
    return [row[: row.index(eos_id) + 1] if eos_id in row else row for row in out]


def _causal_lm(kind: str, vocab_size: int = 100):
    """Tiny random decoders: Llama (the lean step), Qwen2 (the lean step with q/k/v biases), GPT-2 (no
    lean step: the sampler calls the model)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    common = {"vocab_size": vocab_size, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 1}
    if kind == "gpt2":
        cfg = AutoConfig.for_model("gpt2", n_embd=32, n_layer=2, n_head=4, n_positions=128, **common)
    else:
        cfg = AutoConfig.for_model(
            kind, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, **common,
        )  # fmt: skip
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_greedy_matches_generate_token_for_token(kind):
    model = _causal_lm(kind)
    # prompts of different lengths, one repeated (shared prefill), and EOS able to stop rows early
    prompts = [[5, 6, 7, 8, 9], [10, 11], [5, 6, 7, 8, 9], [12, 13, 14]]
    snapshot = generation_model(model, torch.float32)
    assert (snapshot.crosslm_decoder is None) == (kind == "gpt2")
    eos = 1
    ours = sample_tokens(
        snapshot, prompts, max_new_tokens=20, temperature=1.0, top_p=1.0, eos_id=eos, pad_id=0, greedy=True
    )
    assert ours == _generate_greedy(model, prompts, 0, eos, 20)
    # stopping: a row that emitted EOS has no more tokens
    for row in ours:
        assert eos not in row[:-1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_step_gives_the_models_logits(tiny_llm, dtype):
    """Two decode steps after a left-padded prefill: the lean step's logits are the model's own."""
    from transformers import StaticCache

    snap = generation_model(tiny_llm, dtype)
    lean = snap.crosslm_decoder
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])  # row 0 left-padded
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    total = 8
    caches = [StaticCache(config=snap.config, max_cache_len=total) for _ in range(2)]
    with torch.no_grad():
        for cache in caches:
            snap(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
            )
        full_mask = torch.cat([mask, torch.zeros(2, total - 5, dtype=torch.long)], -1)
        bias = torch.zeros(2, total).masked_fill_(full_mask == 0, float("-inf"))
        bias[:, 5:] = 0
        kv = [(layer.keys, layer.values) for layer in caches[1].layers]
        cos, sin = lean.rope_table(total)
        position = positions[:, -1]
        for step, tokens in enumerate(([20, 21], [22, 23])):
            tokens, position = torch.tensor(tokens), position + 1
            full_mask[:, 5 + step] = 1
            want = snap(input_ids=tokens[:, None], attention_mask=full_mask, position_ids=position[:, None],
                        past_key_values=caches[0], use_cache=True).logits[:, -1].float()  # fmt: skip
            got = lean.step(tokens, cos[position], sin[position], kv, 5 + step, bias)
            # the same operations in the same dtype: equal here up to rounding (a wrong activation or
            # rotation moves them by ~1e-3 on this model, whose logits have a spread of ~0.1)
            tol = 1e-5 if dtype == torch.float32 else 5e-4
            assert (got - want).abs().max() <= tol, step


def test_snapshot_carries_the_lora_update(tiny_llm):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_llm, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    ids = torch.tensor([[5, 6, 7, 8]])
    snapshot = generation_model(peft_model, torch.float32)
    assert not any("lora" in n for n, _ in snapshot.named_parameters())
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
        got = snapshot(input_ids=ids).logits
        with peft_model.disable_adapter():
            base = peft_model(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, base, atol=1e-3)  # the adapter changed something, and it is in
    # the snapshot is a copy: the trained adapter is still there
    assert any("lora_B" in n for n, _ in peft_model.named_parameters())


def test_snapshot_cache_reuses_until_a_weight_changes(tiny_llm):
    """Evaluation and the next update's sampling share a snapshot; an optimizer step or an adapter load
    in between forces a rebuild that carries the new weights."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    peft_model = get_peft_model(tiny_llm, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    cache, ids = SnapshotCache(), torch.tensor([[5, 6, 7, 8]])
    first = cache.get(peft_model, torch.float32)
    assert cache.get(peft_model, torch.float32) is first
    assert cache.get(peft_model, torch.bfloat16) is not first  # another dtype is another snapshot
    first = cache.get(peft_model, torch.float32)

    lora = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    opt = torch.optim.SGD(lora, lr=1.0)
    peft_model(input_ids=ids).logits.square().mean().backward()
    opt.step()
    second = cache.get(peft_model, torch.float32)
    assert second is not first
    with torch.no_grad():
        assert torch.allclose(second(input_ids=ids).logits, peft_model(input_ids=ids).logits, atol=1e-5)
        assert not torch.allclose(second(input_ids=ids).logits, first(input_ids=ids).logits, atol=1e-4)

    state = {n: torch.zeros_like(p) for n, p in peft_model.named_parameters() if "lora_" in n}
    set_peft_model_state_dict(peft_model, {k.replace(".default", ""): v for k, v in state.items()})
    assert cache.get(peft_model, torch.float32) is not second


def test_decode_attention_equals_sdpa_for_one_query():
    class Module:
        num_key_value_groups = 3
        is_causal = True

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(0)
    q = torch.randn(4, 6, 1, 8)
    k, v = torch.randn(4, 2, 10, 8), torch.randn(4, 2, 10, 8)
    mask = torch.ones(4, 1, 1, 10, dtype=torch.bool)
    mask[0, ..., :3] = False
    want, _ = sdpa_attention_forward(Module(), q, k, v, mask, scaling=0.3)
    got, _ = decode_attention(Module(), q, k, v, mask, scaling=0.3)
    assert got.shape == want.shape == (4, 1, 6, 8)
    assert torch.allclose(got, want, atol=1e-5)


def test_bfloat16_snapshot_samples_valid_tokens(tiny_llm):
    snapshot = generation_model(tiny_llm, torch.bfloat16)
    assert next(snapshot.parameters()).dtype == torch.bfloat16
    assert next(tiny_llm.parameters()).dtype == torch.float32  # the served model is untouched
    rows = sample_tokens(
        snapshot, [[5, 6], [7]], max_new_tokens=8, temperature=1.0, top_p=0.9, eos_id=1, pad_id=0
    )
    assert len(rows) == 2 and all(1 <= len(r) <= 8 for r in rows)
    assert all(0 <= t < tiny_llm.config.vocab_size for r in rows for t in r)


def test_resolve_dtype():
    from crosslm.precision import resolve_dtype

    assert resolve_dtype("float32") == torch.float32
    assert resolve_dtype("bfloat16") == torch.bfloat16
    assert resolve_dtype("auto") in (torch.float32, torch.bfloat16)
    with pytest.raises(ValueError, match="must be one of auto, float32, bfloat16, got 'int8'"):
        resolve_dtype("int8")


def test_resolve_device_names_the_key_and_refuses_a_missing_gpu(monkeypatch):
    from crosslm.errors import ConfigError
    from crosslm.precision import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"'llm\.device' = 'cuda:0', but this machine's torch sees 0 CUDA"):
        resolve_device("cuda:0", "llm.device")
    with pytest.raises(ConfigError, match=r"'clients\.device' = 'tpu': expected auto, cpu, cuda or cuda:N"):
        resolve_device("tpu", "clients.device")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match="sees 2 CUDA GPU"):
        resolve_device("cuda:2")


def test_real_default_llm_greedy_matches_generate():
    """On SmolLM2-135M-Instruct through its chat template: our path writes what `generate` writes."""
    from crosslm.catalogue.datasets import DATASETS
    from crosslm.catalogue.models import load_llm
    from crosslm.modeling.llm_text import user_prompt_ids

    task = DATASETS["rotten-tomatoes"].load()[0]
    model, tok = load_llm("smollm2-135m-instruct")
    prompts = [user_prompt_ids(tok, task.prompt_for(y)) for y in range(task.num_labels)]
    prompts.append(user_prompt_ids(tok, "Name a colour."))
    eos = tok.eos_token_id
    ours = sample_tokens(
        generation_model(model, torch.float32),
        prompts,
        max_new_tokens=24,
        temperature=1.0,
        top_p=1.0,
        eos_id=eos,
        pad_id=tok.pad_token_id,
        greedy=True,
    )
    assert ours == _generate_greedy(model, prompts, tok.pad_token_id, eos, 24)


def test_packed_linear_matches_linear_for_any_row_count():
    from crosslm.server.decoding import PackedLinear, can_pack_bf16

    if not can_pack_bf16():
        pytest.skip("this torch build has no oneDNN bfloat16 weight packing (generation uses plain Linear)")
    lin = torch.nn.Linear(64, 96, dtype=torch.bfloat16)
    packed = PackedLinear(lin, rows_hint=48)
    for shape in [(1, 64), (3, 1, 64), (100, 64)]:
        x = torch.randn(*shape, dtype=torch.bfloat16)
        assert torch.allclose(packed(x).float(), lin(x).float(), rtol=2e-2, atol=2e-2)
