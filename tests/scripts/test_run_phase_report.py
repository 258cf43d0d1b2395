"""scripts/run_phase_report.py: the run tables of docs/performance.md from a metrics.jsonl."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "run_phase_report.py"


def test_medians_skip_the_warm_up_step_and_memory_takes_the_maximum(tmp_path):
    rows = [
        {"step": 1, "timing/train_s": 40.0, "timing/generate_s": 9.0, "memory/train/policy_cuda_peak_allocated_gb": 90.0,
         "vllm/draft_acceptance_rate_pos_0": 0.30, "vllm/draft_acceptance_rate_pos_1": 0.10},
        {"step": 2, "timing/train_s": 15.0, "timing/generate_s": 5.0, "memory/train/policy_cuda_peak_allocated_gb": 114.0,
         "train/tokens_per_s": 1000.0, "vllm/draft_acceptance_rate_pos_0": 0.35, "vllm/draft_acceptance_rate_pos_1": 0.12},
        {"step": 3, "timing/train_s": 13.0, "timing/generate_s": 4.0, "memory/train/policy_cuda_peak_allocated_gb": 110.0,
         "train/tokens_per_s": 1200.0, "vllm/draft_acceptance_rate_pos_0": 0.40, "vllm/draft_acceptance_rate_pos_1": 0.15},
        {"step": 4, "timing/train_s": 14.0, "memory/train/policy_cuda_peak_allocated_gb": 100.0,
         "vllm/draft_acceptance_rate_pos_1": 0.18, "vllm/draft_acceptance_rate_pos_0": 0.42},
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = subprocess.run([sys.executable, str(SCRIPT), str(path)], capture_output=True, text=True, check=True)
    report = json.loads(out.stdout)
    assert report["steps"] == 4 and report["steady_steps"] == [2, 4]
    assert report["timing_median_s"] == {"train_s": 14.0, "generate_s": 4.5}  # steps 2-4; generate: 2 of them
    assert report["timing_first_steps_s"] == [{"generate_s": 9.0, "train_s": 40.0}]
    assert report["train_tokens_per_s_median"] == 1100.0
    assert report["memory_max_gb"] == {"train/policy_cuda_peak_allocated_gb": 114.0}
    assert report["acceptance_first"] == [0.30, 0.10] and report["acceptance_last"] == [0.42, 0.18]


def test_a_missing_file_is_named(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "nope.jsonl")], capture_output=True, text=True)
    assert out.returncode == 2 and "nope.jsonl does not exist" in out.stderr
