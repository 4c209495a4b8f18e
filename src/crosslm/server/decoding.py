"""Fast batched sampling for synthetic-data generation, so that the main job fits its CPU time budget.

Plain `model.generate` spends most of a CPU step outside the model: it re-runs each prompt's prefill for
every row, grows its KV cache by concatenation, keeps computing finished rows, and sorts the whole
vocabulary every step for top-p. `sample_tokens` computes the same distribution with less work:

- one prefill per distinct prompt (a label's prompt is shared by all its rows), copied into the rows;
- a preallocated (static) KV cache, rows dropped from it as soon as they emit EOS;
- top-p by rejection instead of a sort: draw from the full softmax by inverse CDF, keep the draw if it is
  in the nucleus (the mass of strictly more likely tokens is < p), redraw the rare rows that are not.
  The accepted draw is distributed exactly as the renormalised nucleus, which is what top-p samples from.
- `generation_model` snapshots the LLM with its LoRA update merged in (no adapter branches per step),
  in bfloat16 where this machine multiplies bfloat16 faster than float32 (`dtype: auto`).

With a float32 snapshot the forward pass is the model's own; `tests/test_decoding.py` checks that greedy
decoding reproduces `model.generate` token for token and that the sampler keeps exactly the nucleus.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence
from typing import Any

import torch

from crosslm.modeling.llm_text import cache_kwarg
from crosslm.precision import model_device
from crosslm.seeding import own_rng
from crosslm.server.lean_decode import lean_decoder


def decode_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention for one new token per row as two small matmuls; prefill goes to SDPA.

    For a single query, PyTorch's CPU flash kernel costs several times two batched matmuls
    (2.7 ms against 0.46 ms per layer in bfloat16 at batch 48 and 104 cached positions)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, heads, q_len, dim = query.shape
    if q_len != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    kv_heads = key.shape[1]
    q = query.reshape(batch, kv_heads, heads // kv_heads, dim)  # the query heads that share a key head
    scores = (q @ key.transpose(-1, -2)).float() * (scaling if scaling is not None else dim**-0.5)
    if attention_mask is not None:  # boolean [B, 1, 1, L], True = attend
        scores = scores.masked_fill(~attention_mask, float("-inf"))
    out = torch.softmax(scores, -1).to(value.dtype) @ value
    return out.reshape(batch, 1, heads, dim), None


@functools.lru_cache(maxsize=1)
def _register_decode_attention() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register("crosslm_decode", decode_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register("crosslm_decode", sdpa_mask)
    return "crosslm_decode"


class PackedLinear(torch.nn.Module):
    """A bfloat16 Linear whose weight oneDNN has reordered once for small-batch products.

    On this project's CPU it ran the LM head 11.0 -> 7.5 ms and the MLP down-projection 324 -> 276 us at
    48 rows (benchmarks/bench_generation.py records the end-to-end effect)."""

    def __init__(self, linear: torch.nn.Linear, rows_hint: int):
        super().__init__()
        self.out_features = linear.out_features
        self.weight = torch.nn.Parameter(
            torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), rows_hint), requires_grad=False
        )
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        out = torch.ops.mkldnn._linear_pointwise(flat, self.weight, self.bias, "none", [], "")
        return out.reshape(*x.shape[:-1], self.out_features)


@functools.lru_cache(maxsize=1)
def can_pack_bf16() -> bool:
    """oneDNN weight packing exists in this torch build and gives the product of a plain Linear."""
    try:
        with own_rng(0):  # not the global RNG: a probe must not shift a run's draws
            lin = torch.nn.Linear(64, 96, dtype=torch.bfloat16)
            x = torch.randn(5, 64, dtype=torch.bfloat16)
        got = PackedLinear(lin, 48)(x)
    except (AttributeError, RuntimeError):
        return False
    return torch.allclose(got.float(), lin(x).float(), rtol=2e-2, atol=2e-2)


def generation_model(model: Any, dtype: torch.dtype, rows_hint: int = 48, *, lean: bool = True) -> Any:
    """A frozen copy of `model` for sampling, on the model's device: LoRA adapters merged into the base
    weights, cast to `dtype`; on a CPU with the single-token attention path, the lean decode step of
    Llama-family models (`crosslm_decoder`) and, in bfloat16, oneDNN-packed Linear weights. On a GPU the
    model's own forward and attention kernels are kept. `lean=False` leaves out the lean decode step (a
    snapshot that will only score text, never sample, does not need its fused weights)."""
    snap = copy.deepcopy(model)
    if hasattr(snap, "merge_and_unload"):  # a peft model
        snap = snap.merge_and_unload()
    snap = snap.to(dtype).eval()
    for p in snap.parameters():
        p.requires_grad_(False)
    if model_device(snap).type != "cpu":
        return snap
    if snap.config._attn_implementation == "sdpa":
        snap.set_attn_implementation(_register_decode_attention())
    own = {id(m): m for m in snap.modules() if type(m) is torch.nn.Linear}
    packed: dict[int, PackedLinear] = {}

    def pack(linear: torch.nn.Linear) -> PackedLinear:
        """The snapshot's own Linears are packed once, shared by both forwards; fused ones are new."""
        if id(linear) not in own:
            return PackedLinear(linear, rows_hint)
        if id(linear) not in packed:
            packed[id(linear)] = PackedLinear(linear, rows_hint)
        return packed[id(linear)]

    use_packing = dtype == torch.bfloat16 and can_pack_bf16()
    snap.crosslm_decoder = lean_decoder(snap, pack if use_packing else None) if lean else None
    if use_packing:
        for parent in list(snap.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is torch.nn.Linear:
                    setattr(parent, name, pack(child))
    return snap


class SnapshotCache:
    """The last generation snapshot of a model, reused while none of the model's weights has changed.

    The server scores the LLM right after tuning it and samples from it at the start of the next update;
    nothing writes its weights in between, so both passes read one snapshot and the build (a copy, the
    merge, the cast and the packing: 0.1-0.4 s for SmolLM2-135M on this project's CPU) is paid once."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._snapshot: Any = None

    def get(self, model: Any, dtype: torch.dtype) -> Any:
        key = (id(model), dtype, weights_version(model))
        if key != self._key:
            self._key, self._snapshot = None, None  # free the old snapshot before building the new one
            self._snapshot, self._key = generation_model(model, dtype), key
        return self._snapshot


def sampling_snapshot(model: Any, dtype: torch.dtype, snapshots: SnapshotCache | None = None) -> Any:
    """The generation snapshot of `model` in `dtype`: the cached one when `snapshots` is given (reused while
    the weights are unchanged), else a fresh one."""
    return snapshots.get(model, dtype) if snapshots is not None else generation_model(model, dtype)


def weights_version(model: Any) -> tuple:
    """Changes whenever a parameter is written in place (an optimizer step, load_state_dict, a peft
    adapter load: each bumps the tensor's version counter), moved, or replaced."""
    return tuple((id(p), p.data_ptr(), p._version) for p in model.parameters())


def nucleus_mask(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Reference top-p set (by sorting): token i is kept when the mass of tokens ranked above it is < p."""
    vals, idx = probs.sort(-1, descending=True)
    above = vals.cumsum(-1) - vals
    return torch.zeros_like(probs, dtype=torch.bool).scatter(-1, idx, above < top_p)


def sample_top_p(probs: torch.Tensor, top_p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row from the top-p nucleus of `probs` [B, V], by rejection (no vocabulary sort)."""
    out = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
    rows = torch.arange(probs.shape[0], device=probs.device)
    while rows.numel():
        p = probs if rows.numel() == probs.shape[0] else probs[rows]
        cdf = p.cumsum(-1)
        u = torch.rand(rows.numel(), 1, generator=generator, device=probs.device) * cdf[:, -1:]
        tok = torch.searchsorted(cdf, u, right=True).clamp_(max=p.shape[1] - 1)
        chosen = p.gather(-1, tok)
        # The mass above the chosen token is at most the rest of the row, so a draw whose rest is clearly
        # under top_p is in the nucleus; only the other rows pay for the full check (usually few).
        ok = (cdf[:, -1] - chosen[:, 0]) < top_p - 1e-4
        unsure = torch.nonzero(~ok).flatten()
        if unsure.numel():
            pu = p[unsure]
            ok[unsure] = (pu * (pu > chosen[unsure])).sum(-1) < top_p
        out[rows[ok]] = tok[ok, 0]
        rows = rows[~ok]
    return out


@torch.no_grad()
def sample_tokens(
    model: Any,
    prompts: Sequence[list[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    eos_id: int,
    pad_id: int,
    greedy: bool = False,
) -> list[list[int]]:
    """New tokens for each prompt (up to and including EOS), sampled with temperature and top-p."""
    from transformers import StaticCache

    kw = cache_kwarg(model)
    device = model_device(model)
    unique = list(dict.fromkeys(tuple(p) for p in prompts))
    row_prompt = torch.tensor([unique.index(tuple(p)) for p in prompts], device=device)
    width = max(len(p) for p in unique)
    total = width + max_new_tokens
    ids = torch.full((len(unique), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(unique), total), dtype=torch.long)
    for i, p in enumerate(unique):  # left padding: every prompt ends where generation starts
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) : width] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask[:, :width].cumsum(-1) - 1).clamp(min=0)
    cache = StaticCache(config=model.config, max_cache_len=total)
    out = model(
        input_ids=ids,
        attention_mask=mask[:, :width],
        position_ids=positions,
        **{kw: cache},
        use_cache=True,
        logits_to_keep=1,
    )
    _select_rows(cache, row_prompt)
    logits = out.logits[:, -1].float()[row_prompt]
    mask, position = mask[row_prompt], positions[row_prompt, -1]
    lean = getattr(model, "crosslm_decoder", None)  # set by generation_model for Llama-family CPU snapshots
    if lean is not None:
        # full-attention layers: their keys and values are set once the prompt pass has run
        kv: list[tuple[torch.Tensor, torch.Tensor]] = [(layer.keys, layer.values) for layer in cache.layers]  # type: ignore[union-attr,misc]
        # 0 where a row attends, -inf at its prompt padding; the step reads only the filled positions
        bias = torch.zeros(mask.shape, device=device).masked_fill_(mask == 0, float("-inf"))
        bias[:, width:] = 0
        cos, sin = lean.rope_table(total)
    alive = list(range(len(prompts)))  # the prompt index of each row still sampling
    result: list[list[int]] = [[] for _ in prompts]
    for step in range(max_new_tokens):
        if greedy:
            nxt = logits.argmax(-1)
        else:
            nxt = sample_top_p(
                torch.softmax(logits if temperature == 1.0 else logits / temperature, -1), top_p
            )
        finished = []
        for j, (row, token) in enumerate(zip(alive, nxt.tolist(), strict=True)):
            result[row].append(token)
            if token == eos_id:
                finished.append(j)
        if step == max_new_tokens - 1:
            break
        mask[:, width + step] = 1
        if finished:
            done = set(finished)
            kept = [j for j in range(len(alive)) if j not in done]
            if not kept:
                break
            keep = torch.tensor(kept, dtype=torch.long, device=device)
            alive = [alive[j] for j in kept]
            nxt, mask, position = nxt[keep], mask[keep], position[keep]
            if lean is not None:
                kv, bias = [(k[keep], v[keep]) for k, v in kv], bias[keep]
            else:
                _select_rows(cache, keep)
        position = position + 1
        if lean is not None:
            logits = lean.step(nxt, cos[position], sin[position], kv, width + step, bias)
            continue
        out = model(
            input_ids=nxt[:, None],
            attention_mask=mask,
            position_ids=position[:, None],
            **{kw: cache},
            use_cache=True,
        )
        logits = out.logits[:, -1].float()
    return result


def _select_rows(cache: Any, rows: torch.Tensor) -> None:
    """Keep (or copy) batch rows of a static cache; its update writes along the length axis only."""
    for layer in cache.layers:
        layer.keys = layer.keys[rows]
        layer.values = layer.values[rows]
