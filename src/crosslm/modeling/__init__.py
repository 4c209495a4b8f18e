"""Model code that client, server and evaluation all use, below each of them.

slm.py       the SLM library: supervised and soft-target training, batched inference, label priors
causal_slm.py  causal SLMs on (input, target) pairs: tuning, target log-likelihood, greedy decoding
llm_text.py  the LLM's prompt and answer token ids, padded (prompt, continuation) batches, log-probs
metrics.py   accuracy, macro-F1 and distinct-n
"""
