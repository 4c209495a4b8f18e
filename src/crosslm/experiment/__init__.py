"""`crosslm experiment`: a grid of methods x tasks x seeds over the main job, aggregated into one table.

grid.py     the experiment config, its cells (each one `crosslm.run.run`) and their configs, drift checks
runner.py   runs the cells in order, resumable
results.py  per-cell measures (SLM, LLM, perplexity, synthetic-data fidelity and diversity, bytes, seconds),
            results.csv, results.md (mean and std over seeds, targets) and plots
"""
