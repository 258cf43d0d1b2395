"""Metric sinks: console (a progress line per step), a JSONL file in the run dir, and wandb.

wandb is imported lazily and runs offline unless the user asks for online mode; with online mode
and no ``WANDB_API_KEY``, it degrades to offline with a clear message. Keys are never logged.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

# (metric, short label) shown on the console progress line.
HEADLINE = (("reward/mean", "reward"), ("vllm/draft_acceptance_rate", "acceptance"), ("mtp/loss", "mtp_loss"),
            ("policy/loss", "pg_loss"), ("response/length_mean", "len"), ("eval/reward_mean", "eval_reward"))


class ConsoleLogger:
    def __init__(self, total_steps: int, stream=sys.stdout):
        self.total, self.stream, self.start = total_steps, stream, time.time()

    def log(self, metrics: dict[str, float], step: int) -> None:
        parts = [f"step {step}/{self.total}"]
        for key, label in HEADLINE:
            if key in metrics:
                parts.append(f"{label}={metrics[key]:.3f}")
        if "timing/step_s" in metrics:
            parts.append(f"{metrics['timing/step_s']:.1f}s")
        bar_len = 20
        done = int(bar_len * step / max(self.total, 1))
        bar = "#" * done + "." * (bar_len - done)
        print(f"[{bar}] " + "  ".join(parts), file=self.stream, flush=True)

    def close(self) -> None:
        pass


class JsonlLogger:
    """Appends one JSON object per step to ``metrics.jsonl``; on resume, steps beyond the resumed
    step (from an interrupted run) are dropped so the file stays one line per step."""

    def __init__(self, path: Path, resume_step: int = 0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(self.path)
        self.file = self.path.open("a")

    def log(self, metrics: dict[str, float], step: int) -> None:
        clean = {k: (v if isinstance(v, (int, float)) and math.isfinite(v) else None) for k, v in metrics.items()}
        self.file.write(json.dumps({"step": step, **clean}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class WandbLogger:
    def __init__(self, run_dir: Path, project: str, name: str, config: dict[str, Any], mode: str = "offline"):
        try:
            import wandb
        except ImportError:  # optional at run time
            print("wandb is not installed: metrics go to the console and metrics.jsonl only", file=sys.stderr)
            self.run = None
            return
        if mode == "online" and not os.environ.get("WANDB_API_KEY"):
            print("trainer.wandb_mode=online but WANDB_API_KEY is not set: logging to wandb offline instead",
                  file=sys.stderr)
            mode = "offline"
        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(project=project, name=name, dir=str(run_dir), mode=mode, config=config,
                              resume="allow", reinit=True)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()


class Tracker:
    """Fans metrics out to the configured sinks."""

    def __init__(self, sinks: list):
        self.sinks = sinks

    def log(self, metrics: dict[str, float], step: int) -> None:
        for sink in self.sinks:
            sink.log(metrics, step)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
