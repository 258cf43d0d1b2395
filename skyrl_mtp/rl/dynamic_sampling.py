"""DAPO dynamic sampling: keep only prompt groups whose rewards differ, re-sampling until enough.

This module owns :func:`filter_groups` (which groups carry a learning signal) and
:class:`DynamicSampler` (accumulation across generation rounds). A group whose rollouts all got
the same reward has zero group-normalised advantage for every sample, so it adds nothing to the
policy gradient but dilutes the batch; DAPO drops such groups and generates again until the batch
holds the target number of informative groups.

The sampler never generates: the driver owns generation and loops::

    sampler = DynamicSampler(target_groups=32, max_rounds=4)
    while True:
        batch = generate(next_prompts())                       # the driver's rollouts
        if sampler.add(batch.rewards, batch.uids, batch.samples):
            break
    result = sampler.result()  # samples grouped contiguously, group_index, sources, metrics

``result.sources`` gives each kept sample's ``(round, index in that round's batch)`` so a driver
holding per-round tensors can gather them without passing them through ``samples``.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


def _group_members(group_ids: Sequence[Hashable]) -> list[list[int]]:
    """Sample indices of each group, groups in first-seen order (members need not be contiguous)."""
    groups: dict[Hashable, list[int]] = {}
    for i, gid in enumerate(group_ids):
        groups.setdefault(gid, []).append(i)
    return list(groups.values())


def filter_groups(
    rewards: Tensor | Sequence[float], group_ids: Sequence[Hashable], *, atol: float = 0.0
) -> tuple[list[list[int]], list[list[int]]]:
    """(kept, dropped) groups as lists of sample indices.

    A group is dropped when ``max(r) - min(r) <= atol`` (all rewards equal; a group of one sample
    always). ``atol`` > 0 also drops groups whose rewards differ only by noise.
    """
    values = torch.as_tensor(rewards, dtype=torch.float64).flatten().tolist()
    if len(values) != len(group_ids):
        raise ValueError(f"got {len(values)} rewards but {len(group_ids)} group ids; pass one id per rollout")
    kept, dropped = [], []
    for members in _group_members(group_ids):
        group_rewards = [values[i] for i in members]
        informative = len(members) > 1 and max(group_rewards) - min(group_rewards) > atol
        (kept if informative else dropped).append(members)
    return kept, dropped


@dataclass
class DynamicSamplingResult:
    """The kept rollouts, group after group (samples of one group are contiguous)."""

    samples: list[Any]
    rewards: Tensor  # [N] float32
    group_index: Tensor  # [N] long, 0..num_groups-1: unique per group even if ids repeat across rounds
    sources: list[tuple[int, int]]  # (round, index within that round's batch) per sample
    num_groups: int
    target_reached: bool
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class _KeptGroup:
    round: int
    indices: list[int]
    rewards: list[float]
    samples: list[Any]


class DynamicSampler:
    """Accumulates informative groups over generation rounds.

    `target_groups`: groups wanted for one training step. `max_rounds`: generation rounds allowed
    (None: unlimited, as DAPO's ``max_num_gen_batches=0`` - only safe if some groups are
    informative). :meth:`add` returns True once the target is reached or the rounds are used up;
    :meth:`result` then returns at most `target_groups` groups (surplus groups of the last round
    are trimmed, as DAPO does) and says whether the target was reached.
    """

    def __init__(self, target_groups: int, max_rounds: int | None, *, atol: float = 0.0) -> None:
        if target_groups < 1:
            raise ValueError(f"target_groups must be >= 1, got {target_groups}")
        if max_rounds is not None and max_rounds < 1:
            raise ValueError(f"max_rounds must be >= 1 or None (unlimited), got {max_rounds}")
        if atol < 0:
            raise ValueError(f"atol must be >= 0, got {atol}")
        self.target_groups = target_groups
        self.max_rounds = max_rounds
        self.atol = atol
        self.reset()

    def reset(self) -> None:
        """Empties the sampler for the next training step."""
        self.rounds = 0
        self.dropped_groups = 0
        self._kept: list[_KeptGroup] = []

    @property
    def kept_groups(self) -> int:
        return len(self._kept)

    @property
    def groups_needed(self) -> int:
        """Informative groups still missing; a driver may size the next round from it."""
        return max(self.target_groups - len(self._kept), 0)

    @property
    def done(self) -> bool:
        return self.groups_needed == 0 or (self.max_rounds is not None and self.rounds >= self.max_rounds)

    def add(
        self,
        rewards: Tensor | Sequence[float],
        group_ids: Sequence[Hashable],
        samples: Sequence[Any] | None = None,
    ) -> bool:
        """Adds one round of rollouts (flat; `group_ids` says which prompt each came from).

        `samples` (optional, one per rollout) are returned by :meth:`result` for the kept groups.
        Returns :attr:`done`.
        """
        if self.done:
            raise RuntimeError("DynamicSampler is done; take result() and call reset() before adding more rounds")
        if samples is not None and len(samples) != len(group_ids):
            raise ValueError(f"got {len(samples)} samples but {len(group_ids)} group ids; pass one sample per rollout")
        values = torch.as_tensor(rewards, dtype=torch.float32).flatten().tolist()
        kept, dropped = filter_groups(values, group_ids, atol=self.atol)
        for members in kept:
            self._kept.append(_KeptGroup(
                round=self.rounds,
                indices=members,
                rewards=[values[i] for i in members],
                samples=[samples[i] for i in members] if samples is not None else [None] * len(members),
            ))
        self.dropped_groups += len(dropped)
        self.rounds += 1
        return self.done

    def result(self) -> DynamicSamplingResult:
        """The first `target_groups` kept groups (fewer if the rounds ran out) and the metrics."""
        used = self._kept[: self.target_groups]
        rewards = [r for g in used for r in g.rewards]
        return DynamicSamplingResult(
            samples=[s for g in used for s in g.samples],
            rewards=torch.tensor(rewards, dtype=torch.float32),
            group_index=torch.tensor([gi for gi, g in enumerate(used) for _ in g.indices], dtype=torch.long),
            sources=[(g.round, i) for g in used for i in g.indices],
            num_groups=len(used),
            target_reached=len(used) == self.target_groups,
            metrics=self.metrics(),
        )

    def metrics(self) -> dict[str, float]:
        seen = len(self._kept) + self.dropped_groups
        returned = min(len(self._kept), self.target_groups)
        return {
            "dynamic_sampling/rounds": float(self.rounds),
            "dynamic_sampling/kept_groups": float(len(self._kept)),
            "dynamic_sampling/dropped_groups": float(self.dropped_groups),
            "dynamic_sampling/returned_groups": float(returned),
            "dynamic_sampling/trimmed_groups": float(len(self._kept) - returned),
            "dynamic_sampling/kept_ratio": len(self._kept) / seen if seen else 0.0,
            "dynamic_sampling/target_reached": float(returned == self.target_groups),
        }
