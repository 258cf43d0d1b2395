"""Metric sinks (console progress, JSONL, wandb) and end-of-run plots and summary."""
