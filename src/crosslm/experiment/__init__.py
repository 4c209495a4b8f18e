"""`crosslm experiment`: a grid of methods x tasks x seeds over the main job, aggregated into one table.

runner.py   the experiment config, the grid of cells (each one `crosslm.run.run`), resumable
results.py  per-cell measures (SLM, LLM, perplexity, synthetic-data fidelity and diversity, bytes, seconds),
            results.csv, results.md (mean and std over seeds, targets) and plots
"""
