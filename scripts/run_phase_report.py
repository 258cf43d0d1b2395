"""Step-time split, memory per phase and acceptance of a training run, from its metrics.jsonl; prints JSON.

    python scripts/run_phase_report.py runs/mimo_7b_one_gpu_dapo/metrics.jsonl [--skip-first 1]

The numbers behind docs/performance.md's run tables: the median of each `timing/*` over the steps
(after `--skip-first` warm-up steps, reported apart), the maximum of each `memory/<phase>/*` over
all steps, train tokens/s, and the per-position draft acceptance of the first and last step.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def phase_report(rows: list[dict], skip_first: int = 1) -> dict:
    if len(rows) <= skip_first:
        raise ValueError(f"{len(rows)} steps in the run: need more than --skip-first {skip_first}")
    steady = rows[skip_first:]

    def median(key: str) -> float | None:
        values = [r[key] for r in steady if key in r]
        return statistics.median(values) if values else None

    timings = sorted({k for r in rows for k in r if k.startswith("timing/")})
    memory = sorted({k for r in rows for k in r if k.startswith("memory/")})
    acceptance = sorted({k for r in rows for k in r if k.startswith("vllm/draft_acceptance_rate_pos_")},
                        key=lambda k: int(k.rsplit("_", 1)[1]))
    return {
        "steps": len(rows),
        "steady_steps": [steady[0]["step"], steady[-1]["step"]],
        "timing_median_s": {k.removeprefix("timing/"): median(k) for k in timings},
        "timing_first_steps_s": [{k.removeprefix("timing/"): r[k] for k in timings if k in r} for r in rows[:skip_first]],
        "train_tokens_per_s_median": median("train/tokens_per_s"),
        "memory_max_gb": {k.removeprefix("memory/"): max(r[k] for r in rows if k in r) for k in memory},
        "acceptance_first": [rows[0].get(k) for k in acceptance],
        "acceptance_last": [rows[-1].get(k) for k in acceptance],
        "mean_acceptance_length_last": rows[-1].get("vllm/draft_mean_acceptance_length"),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("metrics", type=Path, help="a run's metrics.jsonl")
    p.add_argument("--skip-first", type=int, default=1, help="warm-up steps left out of the medians")
    args = p.parse_args(argv)
    if not args.metrics.is_file():
        p.error(f"{args.metrics} does not exist: pass a run directory's metrics.jsonl")
    rows = [json.loads(line) for line in args.metrics.read_text().splitlines() if line.strip()]
    report = phase_report(rows, args.skip_first)
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
