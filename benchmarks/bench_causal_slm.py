"""Benchmark: size and training-step time of causal SLMs cut from SmolLM2-135M-Instruct at several depths.

For each depth k (the first k of the LLM's 30 decoder layers, shared embedding and head; the catalogue's
`smollm2-l<k>` entries keep the first and last k/2 instead, which changes the perplexity, not the time),
measures:
- parameters (the tied embedding/head counted once);
- seconds of one forward + backward pass of the causal-LM loss over all positions of a batch of 8 x 96
  tokens (random token ids: speed does not depend on the values);
- seconds of one forward + backward pass of the loss crosslm trains with (`pair_loss`: target tokens only)
  on 8 real bbc-headlines pairs (300-character leads);
- zero-shot per-token perplexity of 64 bbc-headlines headlines given their leads, before any tuning.
Step times are the median of --repeats passes after one warm-up. Run it on one thread, as the table in
crosslm/catalogue/models.py was measured:
  OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/bench_causal_slm.py --depths 4 6 12 30
Prints one JSON line per depth.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from crosslm.catalogue.datasets import load_generation_data
from crosslm.catalogue.models import load_causal_slm
from crosslm.config import DataConfig
from crosslm.evaluation.generation import target_perplexity
from crosslm.modeling.causal_slm import PairFormat, encode_pairs, pair_loss


def _seconds(step: Callable[[], None], repeats: int) -> float:
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        step()
        if i:  # the first pass is the warm-up
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slm", default="smollm2-l6", help="causal SLM catalogue entry whose base is truncated")
    ap.add_argument("--depths", type=int, nargs="+", default=[4, 6, 12, 30])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--ppl-pairs", type=int, default=64)
    args = ap.parse_args()
    torch.manual_seed(0)
    _, data = load_generation_data(DataConfig(dataset="bbc-headlines"))
    inputs, targets = data.inputs[: args.ppl_pairs], data.targets[: args.ppl_pairs]
    fmt = PairFormat(target_noun="headline")
    for k in args.depths:
        model, tok = load_causal_slm(args.slm, num_hidden_layers=k)
        params = sum(p.numel() for p in model.parameters())
        ids = torch.randint(0, model.config.vocab_size, (args.batch, args.tokens))
        pairs = encode_pairs(tok, inputs[: args.batch], targets[: args.batch], fmt)

        def full_step(model: torch.nn.Module = model, ids: torch.Tensor = ids) -> None:
            model.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids).loss.backward()

        def pair_step(model: torch.nn.Module = model, tok: object = tok, pairs: list = pairs) -> None:
            model.zero_grad(set_to_none=True)
            pair_loss(model, tok, pairs).backward()

        model.train()
        full = _seconds(full_step, args.repeats)
        pair = _seconds(pair_step, args.repeats)
        model.eval()
        ppl = target_perplexity(model, tok, inputs, targets, fmt=fmt, batch_size=16)
        row = {
            "k": k,
            "params_m": round(params / 1e6, 1),
            "full_step_s": round(full, 2),
            "pair_step_s": round(pair, 2),
            "pair_tokens": [len(p) + len(t) for p, t in pairs],
            "zero_shot_ppl": round(ppl, 1),
            "threads": torch.get_num_threads(),
        }
        print(json.dumps(row), flush=True)
        del model


if __name__ == "__main__":
    main()
