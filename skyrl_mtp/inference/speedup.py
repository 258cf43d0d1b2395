"""The rollout speedup model of speculative decoding: acceptance x step cost -> speedup.

With k drafts per step and per-position acceptance a_1..a_k as vLLM reports it (accepted tokens
at draft position i / number of drafts; a draft is only accepted if every earlier one was, so
a_i is already the probability that the first i drafts all pass), one decoding step yields

    tokens_per_step(k) = 1 + a_1 + ... + a_k

tokens, and costs c(k) = t_step(k) / t_step(0) times a plain decode step (the verification
forward of k+1 tokens plus k drafter forwards). The predicted rollout speedup is

    speedup(k) = tokens_per_step(k) / c(k).

Acceptance depends on the model and the data (measured by the training runs); c(k) depends on
the hardware, the model shape and the batch size (measured by scripts/bench_spec_decode_cost.py).
A k's acceptance prefix does not depend on later positions, so a run drafting k=3 gives
a_1..a_3 for every k <= 3.
"""

from __future__ import annotations

from typing import Mapping, Sequence


def tokens_per_step(acceptance_per_pos: Sequence[float], k: int) -> float:
    """1 + a_1 + ... + a_k; needs k <= len(acceptance_per_pos)."""
    if k < 0 or k > len(acceptance_per_pos):
        raise ValueError(f"k={k} needs acceptance for positions 1..{k}; got {len(acceptance_per_pos)} positions")
    rates = list(acceptance_per_pos[:k])
    if any(not 0.0 <= a <= 1.0 for a in rates) or any(b > a + 1e-9 for a, b in zip(rates, rates[1:])):
        raise ValueError(f"per-position acceptance must lie in [0, 1] and not increase with position: {rates}")
    return 1.0 + sum(rates)


def predicted_speedup(acceptance_per_pos: Sequence[float], k: int, step_cost_ratio: float) -> float:
    """tokens_per_step(k) / c(k), with c(k) = t_step(k) / t_step(0) (> 0)."""
    if step_cost_ratio <= 0:
        raise ValueError(f"step_cost_ratio must be > 0, got {step_cost_ratio}")
    return tokens_per_step(acceptance_per_pos, k) / step_cost_ratio


def step_cost_ratios(per_k: Mapping, key: str = "median_s") -> dict[int, dict[int, float]]:
    """{batch: {k: c(k)}} from a step-cost report's ``per_k`` ({k: {"batches": {batch: {key: ..}}}},
    keys may be strings as in JSON): each k's ``key`` (``median_s`` per run, or ``step_ms``) over
    k=0's at the same batch size, for the batch sizes k=0 has."""
    runs = {int(k): {int(b): float(v[key]) for b, v in report["batches"].items()} for k, report in per_k.items()}
    if 0 not in runs:
        raise ValueError(f"step-cost ratios need the k=0 runs; the report has k={sorted(runs)}")
    return {b: {k: runs[k][b] / t0 for k in sorted(runs) if b in runs[k]} for b, t0 in sorted(runs[0].items())}


def speedup_table(acceptance_per_pos: Sequence[float],
                  step_cost_ratios: Mapping[int, Mapping[int, float]]) -> dict[int, dict[int, float]]:
    """{batch: {k: speedup}} from {batch: {k: c(k)}}, for every k the acceptance covers (k=0 gives 1)."""
    return {batch: {k: predicted_speedup(acceptance_per_pos, k, ratio)
                    for k, ratio in sorted(ratios.items()) if k <= len(acceptance_per_pos)}
            for batch, ratios in sorted(step_cost_ratios.items())}


def best_k(table: Mapping[int, Mapping[int, float]]) -> dict[int, int]:
    """{batch: the k with the highest predicted speedup}."""
    return {batch: max(row, key=row.get) for batch, row in table.items()}
