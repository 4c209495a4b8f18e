"""CrossLM-over-Flower prototype."""
