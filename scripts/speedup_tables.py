"""Predicted rollout speedup tables from step-cost reports and acceptance profiles; prints JSON
(and, with --markdown, the tables as in docs/performance.md).

    python scripts/speedup_tables.py --reports docs/gpu_results/2026-11-23_h100/spec_decode_cost.json \
        docs/gpu_results/2026-11-23_h100_session2/spec_decode_cost_k3.json \
        --acceptance gpu_run=0.723,0.499,0.234 --acceptance skyrl=0.886,0.770,0.663 --markdown

Each report is a `scripts/bench_spec_decode_cost.py --out` file; their per-k runs are merged (a
later report's k replaces an earlier one's), then c(k) = run time of k / run time of k=0 per
batch size (`--ratio step_ms`: per-step time, the uniform-acceptance bound). The model is
`skyrl_mtp/inference/speedup.py`: speedup(k) = (1 + a_1 + ... + a_k) / c(k).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from skyrl_mtp.inference.speedup import best_k, speedup_table, step_cost_ratios  # noqa: E402


def merged_runs(paths: list[str]) -> dict[int, dict]:
    per_k: dict[int, dict] = {}
    for path in paths:
        report = json.loads(Path(path).read_text())
        if "per_k" not in report:
            raise SystemExit(f"{path}: no 'per_k' in this report (is it a bench_spec_decode_cost.py --out file?)")
        per_k.update({int(k): runs for k, runs in report["per_k"].items()})
    return per_k


def parse_profile(text: str) -> tuple[str, list[float]]:
    name, sep, values = text.rpartition("=")  # the name may hold '=' (e.g. "k=3 run=0.7,0.5")
    try:
        if not sep:
            raise ValueError
        return name, [float(v) for v in values.split(",")]
    except ValueError:
        raise SystemExit(f"--acceptance {text!r}: use NAME=a1,a2,... (per-position acceptance)") from None


def markdown(name: str, acceptance: list[float], table: dict[int, dict[int, float]]) -> str:
    ks = sorted({k for row in table.values() for k in row if k > 0})
    best = best_k(table)
    lines = [f"**{name}**: a = {acceptance}", "",
             "| batch | " + " | ".join(f"k={k}" for k in ks) + " | best k |",
             "|---|" + "---|" * (len(ks) + 1)]
    for batch, row in table.items():
        cells = [f"{row[k]:.2f}" if k in row else "" for k in ks]
        lines.append(f"| {batch} | " + " | ".join(cells) + f" | {best[batch]} |")
    return "\n".join(lines)


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reports", nargs="+", required=True)
    p.add_argument("--acceptance", action="append", required=True, help="NAME=a1,a2,... (repeatable)")
    p.add_argument("--ratio", default="median_s", choices=["median_s", "step_ms"])
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args()
    ratios = step_cost_ratios(merged_runs(args.reports), args.ratio)
    out = {"ratio": args.ratio, "step_cost_ratio": ratios, "profiles": {}}
    for text in args.acceptance:
        name, acceptance = parse_profile(text)
        table = speedup_table(acceptance, ratios)
        out["profiles"][name] = {"acceptance": acceptance, "speedup": table, "best_k": best_k(table)}
        if args.markdown:
            print(markdown(name, acceptance, table) + "\n", file=sys.stderr)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
