"""Advantage estimators (pure torch): a registry with ``grpo`` (group-normalised rewards;
``norm_by_std=False`` gives Dr. GRPO) and ``rloo`` (leave-one-out baseline), plus
:func:`compute_advantages` and :func:`broadcast_to_tokens`.

Per-sequence tensors are ``[N]``; groups are the samples of one prompt.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Callable, Protocol

import torch
from torch import Tensor


class AdvantageEstimator(Protocol):
    def __call__(self, rewards: Tensor, group_index: Tensor, *, norm_by_std: bool, eps: float) -> Tensor:
        """rewards [N] float, group_index [N] long in 0..G-1 -> advantages [N]."""
        ...


_ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {}


def register_advantage_estimator(name: str) -> Callable[[AdvantageEstimator], AdvantageEstimator]:
    """Decorator registering an advantage estimator under `name` (names must be unique)."""

    def decorator(fn: AdvantageEstimator) -> AdvantageEstimator:
        if name in _ADVANTAGE_ESTIMATORS and _ADVANTAGE_ESTIMATORS[name] is not fn:
            raise ValueError(f"advantage estimator {name!r} is already registered; pick another name")
        _ADVANTAGE_ESTIMATORS[name] = fn
        return fn

    return decorator


def known_advantage_estimators() -> list[str]:
    return sorted(_ADVANTAGE_ESTIMATORS)


def get_advantage_estimator(name: str) -> AdvantageEstimator:
    try:
        return _ADVANTAGE_ESTIMATORS[name]
    except KeyError:
        raise ValueError(f"unknown advantage estimator {name!r}; known: {sorted(_ADVANTAGE_ESTIMATORS)}. "
                         "Register one with @register_advantage_estimator(name).") from None


def group_index_from_ids(group_ids: Sequence[Hashable] | Tensor) -> Tensor:
    """Arbitrary group labels (prompt uids, ints) -> long indices 0..G-1 in first-seen order."""
    labels = group_ids.tolist() if isinstance(group_ids, Tensor) else list(group_ids)
    seen: dict[Hashable, int] = {}
    return torch.tensor([seen.setdefault(label, len(seen)) for label in labels], dtype=torch.long)


def group_index_from_size(num_samples: int, group_size: int) -> Tensor:
    """Indices for contiguous groups: samples ``[g*group_size, (g+1)*group_size)`` are group g."""
    if group_size < 1 or num_samples % group_size:
        raise ValueError(f"group_size must be >= 1 and divide the {num_samples} samples, got {group_size}")
    return torch.arange(num_samples) // group_size


def _group_stats(rewards: Tensor, group_index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample (group count, group mean, unbiased group std), computed in float64."""
    r = rewards.to(torch.float64)
    num_groups = int(group_index.max()) + 1
    count = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, group_index, torch.ones_like(r))
    mean = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, group_index, r) / count
    sq_dev = (r - mean[group_index]) ** 2
    var = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, group_index, sq_dev)
    # Bessel-corrected like torch.std; a group of one has no spread (and gets advantage 0 below).
    std = (var / (count - 1).clamp(min=1)).sqrt()
    return count[group_index], mean[group_index], std[group_index]


@register_advantage_estimator("grpo")
def grpo_advantages(rewards: Tensor, group_index: Tensor, *, norm_by_std: bool = True, eps: float = 1e-6) -> Tensor:
    """``(r - mean_group) / (std_group + eps)``, or ``r - mean_group`` with ``norm_by_std=False``.

    A group of one sample has no baseline to compare with: its advantage is 0 rather than the raw
    reward, so a lone sample never pushes the policy on an absolute reward scale.
    """
    count, mean, std = _group_stats(rewards, group_index)
    adv = rewards.to(torch.float64) - mean
    if norm_by_std:
        adv = adv / (std + eps)
    return torch.where(count > 1, adv, torch.zeros_like(adv)).to(rewards.dtype)


@register_advantage_estimator("rloo")
def rloo_advantages(rewards: Tensor, group_index: Tensor, *, norm_by_std: bool = True, eps: float = 1e-6) -> Tensor:
    """``r_i - mean_{j != i} r_j`` (leave-one-out baseline) = ``n / (n - 1) * (r_i - mean)``
    (`norm_by_std` and `eps` do not apply)."""
    count, mean, _ = _group_stats(rewards, group_index)
    adv = (rewards.to(torch.float64) - mean) * count / (count - 1).clamp(min=1)
    return torch.where(count > 1, adv, torch.zeros_like(adv)).to(rewards.dtype)


def compute_advantages(
    rewards: Tensor,
    *,
    group_ids: Sequence[Hashable] | Tensor | None = None,
    group_size: int | None = None,
    estimator: str = "grpo",
    norm_by_std: bool = True,
    eps: float = 1e-6,
) -> Tensor:
    """Per-sequence advantages [N] of `rewards` [N] grouped by `group_ids` or contiguous `group_size`,
    by the registered `estimator` (``algorithm.advantage_estimator``). ``norm_by_std`` (grpo,
    ``algorithm.norm_adv_by_std``): divide by the group's std; False is Dr. GRPO's unbiased
    variant. ``eps`` keeps all-equal groups finite."""
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if rewards.dim() != 1 or rewards.numel() == 0:
        raise ValueError(f"rewards must be a non-empty 1-D tensor [N], got shape {tuple(rewards.shape)}")
    if (group_ids is None) == (group_size is None):
        raise ValueError("pass exactly one of group_ids (a label per sample) or group_size (contiguous groups)")
    if group_ids is not None:
        if len(group_ids) != rewards.numel():
            raise ValueError(f"group_ids has {len(group_ids)} entries for {rewards.numel()} rewards")
        index = group_index_from_ids(group_ids)
    else:
        index = group_index_from_size(rewards.numel(), group_size)
    if not rewards.is_floating_point():
        rewards = rewards.float()
    return get_advantage_estimator(estimator)(rewards, index.to(rewards.device), norm_by_std=norm_by_std, eps=eps)


def broadcast_to_tokens(advantages: Tensor, response_mask: Tensor) -> Tensor:
    """Per-sequence advantages [B] -> per-token [B, T], zero where the mask is 0."""
    if advantages.dim() != 1 or response_mask.dim() != 2 or advantages.shape[0] != response_mask.shape[0]:
        raise ValueError(f"expected advantages [B] and response_mask [B, T], got {tuple(advantages.shape)} "
                         f"and {tuple(response_mask.shape)}")
    return advantages[:, None] * response_mask.to(advantages.dtype)
