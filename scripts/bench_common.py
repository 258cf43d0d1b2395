"""What the train-step benchmarks (bench_train_step.py, bench_packing.py) share: every variant runs
in its own child process on one random checkpoint (one process's CUDA memory is not reliably
returned after `del`, and a fresh allocator makes the peaks comparable), and the timed loop."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import torch


def run_variants(script: str, variants: tuple[str, ...], model: Any, prefix: str) -> dict[str, dict]:
    """Saves a random checkpoint of ``model``, then runs ``script`` with this process's arguments
    plus ``--variant NAME --model-path DIR`` for each variant; returns each child's last JSON line."""
    from skyrl_mtp.models.checkpoint import random_hf_state_dict, save_hf_checkpoint

    path = tempfile.mkdtemp(prefix=f"{prefix}_") + "/model"
    save_hf_checkpoint(model, random_hf_state_dict(model, 0), path)
    results = {}
    for name in variants:
        proc = subprocess.run([sys.executable, script, *sys.argv[1:], "--variant", name, "--model-path", path],
                              stdout=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{prefix}: the {name} run failed (exit {proc.returncode}); see its stderr above")
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{name}: {results[name]}", file=sys.stderr, flush=True)
    return results


def time_train_steps(policy: Any, batch_for_step: Callable[[int], dict], warmup: int, steps: int) -> dict:
    """``warmup`` untimed then ``steps`` timed ``policy.train_step`` calls (CUDA synchronised):
    median and min step time, and the peak CUDA memory where there is a GPU."""
    times = []
    for step in range(warmup + steps):
        batch = batch_for_step(step)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        policy.train_step(batch)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    result = {"median_s": statistics.median(times), "min_s": min(times)}
    if torch.cuda.is_available():
        result["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result
