"""One decode step of a Llama-family model in plain torch, for the CPU sampler (generation speed).

At 48 rows SmolLM2-135M spends about a third of a decode step outside its matrix products, most of it in
the Python of `model.forward`: per-layer module calls, mask construction, the cache's bookkeeping and
keyword plumbing. `LeanDecoder.step` computes the same function with the same operations, in the same
order and dtype, and leaves out what one token per row does not need:

- q, k and v in one product, and gate and up in one product (concatenated weights); q and k rotated together;
- cos and sin looked up in a table built once by the model's own rotary embedding;
- attention over the filled part of the cache only, with an additive mask for the prompt padding;
- no mask or cache objects per step: the key/value tensors are written in place at the step's slot.

The prompt prefill still runs through the model's own forward. Only architectures whose decoder layer is
exactly the Llama one are accepted (`lean_decoder` returns None for anything else, and the sampler then
calls the model). `tests/test_decoding.py` checks greedy decoding against `model.generate` token for token
and the step's logits against the model's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

# model_type -> the decoder layer is Llama's: pre-norm RMSNorm, rotary q/k, grouped-query attention,
# SiLU-gated MLP (qwen2 adds q/k/v biases, which the fused product keeps).
LLAMA_LIKE = ("llama", "mistral", "qwen2")
# Rope types whose angle for a position does not depend on the sequence length seen so far.
STATIC_ROPE = ("default", "linear", "llama3", "yarn")


def _fused(linears: list[torch.nn.Linear], dtype: torch.dtype) -> torch.nn.Linear:
    """One Linear whose output is the concatenation of `linears`' outputs."""
    weight = torch.cat([lin.weight.detach() for lin in linears])
    biases = [lin.bias for lin in linears]
    out = torch.nn.utils.skip_init(  # no random initialisation: every value is copied in below
        torch.nn.Linear, weight.shape[1], weight.shape[0], bias=biases[0] is not None, dtype=dtype,
        device=weight.device,
    )  # fmt: skip
    with torch.no_grad():
        out.weight.copy_(weight)
        if out.bias is not None:
            out.bias.copy_(torch.cat([b.detach() for b in biases]))
    return out.requires_grad_(False)


@dataclass
class _Layer:
    in_norm: torch.Tensor
    qkv: Any
    o: Any
    post_norm: torch.Tensor
    gate_up: Any
    down: Any


def lean_decoder(model: Any, wrap: Any = None) -> LeanDecoder | None:
    """A LeanDecoder for `model` (a float snapshot), or None where its architecture is not Llama's.
    `wrap(linear)` may replace each (fused) Linear, e.g. by a oneDNN-packed one."""
    cfg = model.config
    rope = (getattr(cfg, "rope_parameters", None) or {}).get("rope_type", "default")
    if (
        getattr(cfg, "model_type", None) not in LLAMA_LIKE
        or getattr(cfg, "hidden_act", None) != "silu"
        or getattr(cfg, "mlp_bias", False)
        or rope not in STATIC_ROPE
        or not hasattr(model, "model")
        or not hasattr(model, "lm_head")
    ):
        return None
    try:
        return LeanDecoder(model, wrap or (lambda lin: lin))
    except (AttributeError, TypeError):  # a Llama-like config on modules laid out differently
        return None


class LeanDecoder:
    """The model's decode step: token ids -> next-token logits, reading and writing a static KV cache."""

    def __init__(self, model: Any, wrap: Any):
        cfg, base = model.config, model.model
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.sliding_window = (
            getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
        )
        self.eps = cfg.rms_norm_eps
        self.embed = base.embed_tokens.weight
        self.dtype = self.embed.dtype
        self.rotary = base.rotary_emb
        self.scaling = base.layers[0].self_attn.scaling
        self.layers = []
        for layer in base.layers:
            att, mlp = layer.self_attn, layer.mlp
            if type(mlp.act_fn).__name__ not in ("SiLU", "SiLUActivation"):
                raise TypeError("not a SiLU-gated MLP")
            self.layers.append(
                _Layer(
                    in_norm=layer.input_layernorm.weight,
                    qkv=wrap(_fused([att.q_proj, att.k_proj, att.v_proj], self.dtype)),
                    o=wrap(att.o_proj),
                    post_norm=layer.post_attention_layernorm.weight,
                    gate_up=wrap(_fused([mlp.gate_proj, mlp.up_proj], self.dtype)),
                    down=wrap(mlp.down_proj),
                )
            )
        self.norm = base.norm.weight
        self.lm_head = wrap(model.lm_head)

    def rope_table(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [length, head_dim] for positions 0..length-1, from the model's rotary embedding."""
        positions = torch.arange(length, device=self.embed.device)[None]
        cos, sin = self.rotary(self.embed[:1][None], position_ids=positions)
        return cos[0], sin[0]

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        h = x.float()  # LlamaRMSNorm: the statistics in float32, the product in the model's dtype
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * h.to(x.dtype)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin

    def step(
        self,
        tokens: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: list[tuple[torch.Tensor, torch.Tensor]],
        slot: int,
        bias: torch.Tensor,
    ) -> torch.Tensor:
        """Logits [B, V] (float32) for `tokens` [B] written at cache position `slot`.

        cos/sin: [B, head_dim], the rows' rotary angles; cache: per layer (keys, values) [B, kv_heads, L, d];
        bias: [B, >= slot + 1] float32, 0 where a row attends and -inf at its padding."""
        if self.sliding_window is not None and slot + 1 > self.sliding_window:
            raise ValueError(
                f"sequence of {slot + 1} positions exceeds the sliding window {self.sliding_window}"
            )
        rows, group = tokens.shape[0], self.heads // self.kv_heads
        cos, sin = cos[:, None], sin[:, None]
        mask = bias[:, None, None, : slot + 1]
        h = F.embedding(tokens, self.embed)
        for layer, (keys, values) in zip(self.layers, cache, strict=True):
            qkv = layer.qkv(self._rms(h, layer.in_norm)).view(rows, -1, self.head_dim)
            qk = self._rotate(qkv[:, : self.heads + self.kv_heads], cos, sin)  # q and k in one rotation
            keys[:, :, slot] = qk[:, self.heads :]
            values[:, :, slot] = qkv[:, self.heads + self.kv_heads :]
            # the query heads that share a key head side by side
            q = qk[:, : self.heads].view(rows, self.kv_heads, group, self.head_dim)
            scores = (q @ keys[:, :, : slot + 1].transpose(-1, -2)).float() * self.scaling + mask
            att = torch.softmax(scores, -1).to(h.dtype) @ values[:, :, : slot + 1]
            h = h + layer.o(att.reshape(rows, -1))
            gate, up = layer.gate_up(self._rms(h, layer.post_norm)).chunk(2, -1)
            h = h + layer.down(F.silu(gate) * up)
        return self.lm_head(self._rms(h, self.norm)).float()
