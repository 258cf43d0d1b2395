"""Running ``python -m skyrl_mtp.train`` as a user would, at a small scale (not a test module):
shared by the driver tests (end to end, packing, pipeline parallel)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# Two steps of 4 prompts x 2 samples, a short warm start and short responses.
SMALL = ["trainer.total_steps=2", "trainer.warm_start.steps=8", "trainer.train_batch_size=4",
         "trainer.n_samples_per_prompt=2", "trainer.ppo_mini_batch_size=2", "data.num_eval=4",
         "trainer.loggers=[console,jsonl]", "generator.max_response_length=32", "algorithm.dynamic_sampling.max_rounds=2"]


def train_cmd(run_dir: Path, *extra: str) -> list[str]:
    """The command line of a SMALL run in `run_dir`, `extra` overrides last."""
    return [sys.executable, "-m", "skyrl_mtp.train", f"trainer.run_dir={run_dir}", *SMALL, *extra]


def run_train(run_dir: Path, *extra: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Runs :func:`train_cmd` to the end, output captured (unbuffered, so a failure shows its last lines)."""
    return subprocess.run(train_cmd(run_dir, *extra), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def metrics_rows(run_dir: Path) -> list[dict]:
    """The rows of the run's metrics.jsonl, one per step."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
