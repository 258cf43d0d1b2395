"""Choosing, step by step, how many tokens the engines draft (``generator.draft_control=auto``).

Drafting pays only where a verify step of 1 + k tokens costs little more than a plain decode step
(memory-bound decoding of a large model on a GPU). On the CPU backend the tiny demo model's
rollouts run *slower* with drafting (5,800 tokens/s at k=0, 3,000 at k=2 with 2.2 tokens per
step: docs/performance.md), and on a GPU the best k depends on the batch and on how good the head
has become. So the run measures instead of assuming:

* The engines are built with the largest k (``trainer.mtp.num_speculative_tokens``, K) and vLLM's
  batch-size schedule table, which the engine rewrites before each rollout to the k chosen here
  (``RolloutEngine.set_num_draft_tokens``; k=0 switches drafting off without a restart).
* After a rollout at k, :meth:`DraftController.observe` records the engines' generation
  throughput (tokens/s) and per-position acceptance. From throughputs at k and at 0 and the
  acceptance seen at k, the step cost of k follows (:mod:`skyrl_mtp.inference.speedup`):
  ``c(k) = tokens_per_step(a, k) * tput(0) / tput(k)``. Step costs depend on the hardware and the
  shapes, so they are kept; acceptance changes as the head learns, so the *latest* per-position
  acceptance is used to predict ``speedup(k) = tokens_per_step(a_now, k) / c(k)``
  (:func:`~skyrl_mtp.inference.spec_tuning.choose_k`).
* Every ``probe_every``-th step runs a k other than the chosen one, in turn: with drafting off
  this keeps measuring acceptance (the head still trains), with drafting on it refreshes the
  k=0 baseline. Until every k has been measured once, the steps measure (K first, then 0, ...).

Throughput of one rollout also depends on its lengths, so each measurement is smoothed
(exponential average over the steps run at that k). The controller is plain Python: the driver
feeds it the metrics it logs anyway.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from skyrl_mtp.inference.spec_tuning import choose_k
from skyrl_mtp.inference.speedup import tokens_per_step


@dataclass
class DraftController:
    max_k: int
    probe_every: int = 5
    min_gain: float = 0.05
    smoothing: float = 0.5  # weight of the newest throughput in the running average
    throughput: dict[int, float] = field(default_factory=dict)  # k -> smoothed tokens/s
    acceptance_at: dict[int, list[float]] = field(default_factory=dict)  # k -> acceptance when tput was measured
    acceptance_now: list[float] = field(default_factory=list)  # the latest per-position acceptance
    steps: int = 0
    chosen: int = 0

    def __post_init__(self) -> None:
        if self.max_k < 1:
            raise ValueError(f"DraftController.max_k must be >= 1 (the engines' largest k), got {self.max_k}")
        if self.probe_every < 2:
            raise ValueError(f"DraftController.probe_every must be >= 2 (every n-th step probes), got {self.probe_every}")
        if not 0.0 < self.smoothing <= 1.0:
            raise ValueError(f"DraftController.smoothing must be in (0, 1], got {self.smoothing}")

    def candidates(self) -> list[int]:
        return list(range(self.max_k + 1))

    def step_costs(self) -> dict[int, float]:
        """c(k) for every k measured so far (needs k=0's throughput); c(0) = 1."""
        if 0 not in self.throughput:
            return {}
        out = {0: 1.0}
        for k, tput in self.throughput.items():
            if k and tput > 0 and k in self.acceptance_at:
                out[k] = tokens_per_step(self.acceptance_at[k], k) * self.throughput[0] / tput
        return out

    def predicted_speedups(self) -> dict[int, float]:
        """tokens_per_step(latest acceptance, k) / c(k) for every k with a measured cost."""
        costs = self.step_costs()
        return {k: (tokens_per_step(self.acceptance_now, k) / c if k else 1.0)
                for k, c in costs.items() if k <= len(self.acceptance_now)}

    def best(self) -> int:
        costs = self.step_costs()
        if not costs or not self.acceptance_now:
            return self.max_k
        return choose_k(costs, self.acceptance_now, min_gain=self.min_gain)

    def next_k(self) -> int:
        """The k of the next rollout: unmeasured ks first (K, then 0, then the rest), then the best
        predicted k, except every ``probe_every``-th step, which runs the other ks in turn."""
        unmeasured = [k for k in [self.max_k, 0, *range(1, self.max_k)] if k not in self.throughput]
        if unmeasured:
            return unmeasured[0]
        self.chosen = self.best()
        if (self.steps + 1) % self.probe_every == 0:
            others = [k for k in self.candidates() if k != self.chosen]
            return others[((self.steps + 1) // self.probe_every - 1) % len(others)]
        return self.chosen

    def observe(self, k: int, tokens_per_s: float, acceptance_per_pos: list[float] | None) -> None:
        """Record a rollout run at ``k``: the engines' generation tokens/s and, for k >= 1, the
        acceptance per draft position (vLLM's unconditional rates, ``draft_acceptance_rate_pos_i``)."""
        if not 0 <= k <= self.max_k:
            raise ValueError(f"k={k} is outside 0..{self.max_k}")
        self.steps += 1
        if not tokens_per_s > 0:
            return  # nothing generated (e.g. every group filtered): nothing learned about speed
        if k:
            rates = [min(max(float(a), 0.0), 1.0) for a in (acceptance_per_pos or [])][:k]
            if len(rates) < k:
                return  # no drafts were verified this step
            for i in range(1, len(rates)):  # rounding can make a later rate exceed an earlier one
                rates[i] = min(rates[i], rates[i - 1])
            # positions beyond k keep their older rates, capped so the profile never rises
            merged = rates + self.acceptance_now[len(rates):]
            for i in range(1, len(merged)):
                merged[i] = min(merged[i], merged[i - 1])
            self.acceptance_now = merged
            self.acceptance_at[k] = rates
        old = self.throughput.get(k)
        self.throughput[k] = tokens_per_s if old is None else (
            self.smoothing * tokens_per_s + (1 - self.smoothing) * old)

    def metrics(self) -> dict[str, float]:
        out = {"draft/k_best": float(self.chosen)}
        for k, c in self.step_costs().items():
            if k:
                out[f"draft/step_cost_k{k}"] = c
        for k, s in self.predicted_speedups().items():
            if k:
                out[f"draft/predicted_speedup_k{k}"] = s
        return out

    def state_dict(self) -> dict:
        return {"throughput": {str(k): v for k, v in self.throughput.items()},
                "acceptance_at": {str(k): v for k, v in self.acceptance_at.items()},
                "acceptance_now": list(self.acceptance_now), "steps": self.steps, "chosen": self.chosen}

    def load_state_dict(self, state: dict) -> None:
        self.throughput = {int(k): float(v) for k, v in state["throughput"].items()}
        self.acceptance_at = {int(k): list(v) for k, v in state["acceptance_at"].items()}
        self.acceptance_now = list(state["acceptance_now"])
        self.steps, self.chosen = int(state["steps"]), int(state["chosen"])
