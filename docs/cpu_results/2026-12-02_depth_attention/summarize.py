"""Summarises the depth_attention A/B (run.sh beside this file): per arm and window of steps, the
acceptance per draft position pooled over the window's drafts (weighted by vllm/num_drafts), the
conditional acceptance at each depth >= 2, the mean acceptance length and the logged TV per depth.
    python docs/cpu_results/2026-12-02_depth_attention/summarize.py /tmp/ab2   # prints JSON lines
"""
import json
import sys
from pathlib import Path

root = Path(sys.argv[1])
for k in (2, 3):
    for mode in ("causal", "drafter_cache"):
        path = root / f"k{k}_{mode}" / "metrics.jsonl"
        if not path.exists():
            continue
        rows = [json.loads(line) for line in path.open()]
        for lo, hi in ((1, 20), (21, 40)):
            window = [r for r in rows if lo <= r["step"] <= hi and r.get("vllm/num_drafts")]
            drafts = sum(r["vllm/num_drafts"] for r in window)
            pos = [sum(r[f"vllm/draft_acceptance_rate_pos_{i}"] * r["vllm/num_drafts"] for r in window) / drafts
                   for i in range(k)]
            print(json.dumps({
                "k": k, "depth_attention": mode, "steps": f"{lo}-{hi}", "drafts": drafts,
                "acceptance_per_position": [round(a, 4) for a in pos],
                "conditional_at_depth": [round(pos[i] / pos[i - 1], 4) for i in range(1, k)],
                "mean_acceptance_length": round(1 + sum(pos), 4),
                "tv_per_depth": [round(sum(r[f"mtp/loss_depth_{d}"] for r in window) / len(window), 4)
                                 for d in range(1, k + 1)],
                "train_reward": round(sum(r.get("reward/mean", 0.0) for r in window) / len(window), 4),
            }))
