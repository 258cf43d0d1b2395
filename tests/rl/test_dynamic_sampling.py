"""DAPO dynamic sampling: all-equal groups dropped, accumulation to the target, max rounds respected."""

from __future__ import annotations

import pytest
import torch

from skyrl_mtp.rl.advantages import compute_advantages
from skyrl_mtp.rl.dynamic_sampling import DynamicSampler, filter_groups


def test_filter_groups_drops_all_equal_and_singletons():
    rewards = [1, 1, 0, 1, 0.5, 0.5, 2, 0.3]
    ids = ["a", "a", "b", "b", "c", "c", "d", "e"]
    kept, dropped = filter_groups(rewards, ids)
    assert kept == [[2, 3]]
    assert dropped == [[0, 1], [4, 5], [6], [7]]


def test_filter_groups_non_contiguous_members_and_atol():
    kept, dropped = filter_groups(torch.tensor([0.0, 1.0, 0.0, 1.0001]), [0, 1, 0, 1], atol=0.0)
    assert kept == [[1, 3]] and dropped == [[0, 2]]
    kept, _ = filter_groups([0.0, 1.0, 0.0, 1.0001], [0, 1, 0, 1], atol=1e-3)
    assert kept == []
    with pytest.raises(ValueError, match="3 rewards but 2 group ids"):
        filter_groups([1, 2, 3], [0, 0])


def _round(prefix: str, rewards_per_group: list[list[float]]):
    rewards, ids, samples = [], [], []
    for g, group in enumerate(rewards_per_group):
        for k, r in enumerate(group):
            rewards.append(r)
            ids.append(g)  # the same ids each round on purpose: the sampler must keep groups apart
            samples.append(f"{prefix}{g}.{k}")
    return rewards, ids, samples


def test_accumulates_until_target_and_trims_surplus():
    sampler = DynamicSampler(target_groups=3, max_rounds=5)
    # Round 0: one informative group of three.
    assert sampler.add(*_round("r0g", [[1, 1], [0, 1], [0, 0]])) is False
    assert sampler.kept_groups == 1 and sampler.groups_needed == 2
    # Round 1: three informative groups; one more than needed.
    assert sampler.add(*_round("r1g", [[1, 0], [0.5, 0.5], [0, 1], [0.2, 0.9]])) is True
    result = sampler.result()
    assert result.target_reached and result.num_groups == 3
    assert result.samples == ["r0g1.0", "r0g1.1", "r1g0.0", "r1g0.1", "r1g2.0", "r1g2.1"]
    assert result.sources == [(0, 2), (0, 3), (1, 0), (1, 1), (1, 4), (1, 5)]
    torch.testing.assert_close(result.rewards, torch.tensor([0.0, 1.0, 1.0, 0.0, 0.0, 1.0]))
    assert result.group_index.tolist() == [0, 0, 1, 1, 2, 2]  # distinct although ids repeat across rounds
    assert result.metrics == {
        "dynamic_sampling/rounds": 2.0,
        "dynamic_sampling/kept_groups": 4.0,
        "dynamic_sampling/dropped_groups": 3.0,
        "dynamic_sampling/returned_groups": 3.0,
        "dynamic_sampling/trimmed_groups": 1.0,
        "dynamic_sampling/kept_ratio": 4 / 7,
        "dynamic_sampling/target_reached": 1.0,
    }
    # The kept batch feeds the advantage estimator directly.
    adv = compute_advantages(result.rewards, group_ids=result.group_index)
    assert (adv != 0).all()


def test_max_rounds_respected():
    sampler = DynamicSampler(target_groups=4, max_rounds=2)
    assert sampler.add(*_round("a", [[1, 1], [0, 1]])) is False
    assert sampler.add(*_round("b", [[0, 0], [0, 0]])) is True  # rounds used up, target not reached
    result = sampler.result()
    assert not result.target_reached and result.num_groups == 1
    assert result.metrics["dynamic_sampling/rounds"] == 2.0
    assert result.metrics["dynamic_sampling/target_reached"] == 0.0
    with pytest.raises(RuntimeError, match="done"):
        sampler.add([0.0, 1.0], [0, 0])


def test_nothing_informative_gives_an_empty_result():
    sampler = DynamicSampler(target_groups=1, max_rounds=1)
    assert sampler.add([1.0, 1.0], ["x", "x"]) is True
    result = sampler.result()
    assert result.num_groups == 0 and result.samples == [] and result.rewards.numel() == 0


def test_unlimited_rounds_reset_and_default_samples():
    sampler = DynamicSampler(target_groups=1, max_rounds=None)
    for _ in range(10):
        assert sampler.add([0.0, 0.0], [0, 0]) is False
    assert sampler.add(torch.tensor([0.0, 1.0]), [7, 7]) is True
    result = sampler.result()
    assert result.samples == [None, None] and result.sources == [(10, 0), (10, 1)]
    sampler.reset()
    assert sampler.rounds == 0 and sampler.kept_groups == 0 and not sampler.done


def test_argument_errors():
    with pytest.raises(ValueError, match="target_groups"):
        DynamicSampler(0, 3)
    with pytest.raises(ValueError, match="max_rounds"):
        DynamicSampler(2, 0)
    with pytest.raises(ValueError, match="2 samples but 3 group ids"):
        DynamicSampler(2, 3).add([0, 1, 2], [0, 0, 1], samples=["a", "b"])
