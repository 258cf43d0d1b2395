"""RL algorithm math, pure torch: advantages, policy losses, KL / entropy terms, DAPO overlong shaping.

This module owns

* the advantage-estimator registry (:func:`register_advantage_estimator`,
  :func:`get_advantage_estimator`, :func:`known_advantage_estimators`) with ``grpo`` (group-normalised rewards; ``norm_by_std=False``
  gives Dr. GRPO) and ``rloo`` (leave-one-out baseline), plus :func:`compute_advantages` and
  :func:`broadcast_to_tokens`;
* the policy-loss registry (:func:`register_policy_loss`, :func:`get_policy_loss`,
  :func:`known_policy_losses`) with
  ``ppo_clip`` (asymmetric DAPO clip-higher, optional dual clip) and :func:`aggregate_loss`'s
  modes ``token_mean`` / ``seq_mean_token_sum`` / ``seq_mean_token_mean``;
* KL estimators between the policy and a reference (:func:`kl_penalty`, :func:`kl_loss`) and
  entropy helpers (:func:`entropy_from_logits`, :func:`aggregate_entropy`);
* DAPO's soft overlong punishment (:func:`overlong_penalty`) and overlong filtering
  (:func:`overlong_filter_mask`).

Shapes: per-sequence tensors are ``[B]``; per-token tensors are ``[B, T]`` over the response
tokens, with ``response_mask`` 1 on real response tokens and 0 on padding (and on whole sequences
that overlong filtering removed). Nothing here knows about Megatron, vLLM or devices.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import Tensor

LOSS_AGG_MODES = ("token_mean", "seq_mean_token_sum", "seq_mean_token_mean")


# --------------------------------------------------------------------------------------------
# Advantage estimators
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdvantageConfig:
    """`estimator` names a registered estimator. ``norm_by_std`` (grpo): divide by the group's
    std; False is Dr. GRPO's unbiased variant. ``eps`` keeps all-equal groups finite."""

    estimator: str = "grpo"
    norm_by_std: bool = True
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.eps < 0:
            raise ValueError(f"AdvantageConfig.eps must be >= 0, got {self.eps}")


class AdvantageEstimator(Protocol):
    def __call__(self, rewards: Tensor, group_index: Tensor, config: AdvantageConfig) -> Tensor:
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
def grpo_advantages(rewards: Tensor, group_index: Tensor, config: AdvantageConfig) -> Tensor:
    """``(r - mean_group) / (std_group + eps)``, or ``r - mean_group`` with ``norm_by_std=False``.

    A group of one sample has no baseline to compare with: its advantage is 0 rather than the raw
    reward, so a lone sample never pushes the policy on an absolute reward scale.
    """
    count, mean, std = _group_stats(rewards, group_index)
    adv = rewards.to(torch.float64) - mean
    if config.norm_by_std:
        adv = adv / (std + config.eps)
    return torch.where(count > 1, adv, torch.zeros_like(adv)).to(rewards.dtype)


@register_advantage_estimator("rloo")
def rloo_advantages(rewards: Tensor, group_index: Tensor, config: AdvantageConfig) -> Tensor:
    """``r_i - mean_{j != i} r_j`` (leave-one-out baseline) = ``n / (n - 1) * (r_i - mean)``."""
    count, mean, _ = _group_stats(rewards, group_index)
    adv = (rewards.to(torch.float64) - mean) * count / (count - 1).clamp(min=1)
    return torch.where(count > 1, adv, torch.zeros_like(adv)).to(rewards.dtype)


def compute_advantages(
    rewards: Tensor,
    *,
    group_ids: Sequence[Hashable] | Tensor | None = None,
    group_size: int | None = None,
    config: AdvantageConfig = AdvantageConfig(),
) -> Tensor:
    """Per-sequence advantages [N] of `rewards` [N] grouped by `group_ids` or contiguous `group_size`."""
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
    return get_advantage_estimator(config.estimator)(rewards, index.to(rewards.device), config)


def broadcast_to_tokens(advantages: Tensor, response_mask: Tensor) -> Tensor:
    """Per-sequence advantages [B] -> per-token [B, T], zero where the mask is 0."""
    if advantages.dim() != 1 or response_mask.dim() != 2 or advantages.shape[0] != response_mask.shape[0]:
        raise ValueError(f"expected advantages [B] and response_mask [B, T], got {tuple(advantages.shape)} "
                         f"and {tuple(response_mask.shape)}")
    return advantages[:, None] * response_mask.to(advantages.dtype)


# --------------------------------------------------------------------------------------------
# Loss aggregation
# --------------------------------------------------------------------------------------------


def aggregate_loss(
    values: Tensor,
    mask: Tensor,
    mode: str = "token_mean",
    *,
    num_tokens: float | Tensor | None = None,
    num_seqs: float | Tensor | None = None,
) -> Tensor:
    """Reduces per-token `values` [B, T] over `mask` [B, T] to a scalar.

    * ``token_mean`` (DAPO): sum over all valid tokens / number of valid tokens in the batch, so
      every token weighs the same and long responses are not down-weighted.
    * ``seq_mean_token_sum``: per-sequence sum, then mean over sequences.
    * ``seq_mean_token_mean`` (original GRPO): per-sequence mean, then mean over sequences.

    Sequences with no valid token (padding rows, overlong-filtered responses) do not count in
    the sequence means. When a batch is split into micro-batches, pass the whole batch's
    `num_tokens` (token_mean) or `num_seqs` (seq modes) so the micro-batch losses sum to the
    batch loss.
    """
    if values.shape != mask.shape or values.dim() != 2:
        raise ValueError(f"values and mask must both be [B, T], got {tuple(values.shape)} and {tuple(mask.shape)}")
    mask = mask.to(values.dtype)
    if mode == "token_mean":
        denom = mask.sum() if num_tokens is None else num_tokens
        return (values * mask).sum() / _at_least_one(denom, values)
    seq_tokens = mask.sum(-1)
    seq_valid = (seq_tokens > 0).to(values.dtype)
    if mode == "seq_mean_token_sum":
        per_seq = (values * mask).sum(-1)
    elif mode == "seq_mean_token_mean":
        per_seq = (values * mask).sum(-1) / seq_tokens.clamp(min=1)
    else:
        raise ValueError(f"unknown loss_agg_mode {mode!r}; use one of {LOSS_AGG_MODES}")
    denom = seq_valid.sum() if num_seqs is None else num_seqs
    return (per_seq * seq_valid).sum() / _at_least_one(denom, values)


def _at_least_one(denom: float | Tensor, like: Tensor) -> Tensor:
    # An all-masked batch gives loss 0 (still connected to the graph) rather than NaN.
    return torch.as_tensor(denom, dtype=like.dtype, device=like.device).clamp(min=1)


def _masked_mean(values: Tensor, mask: Tensor) -> float:
    mask = mask.to(values.dtype)
    return float((values * mask).sum() / mask.sum().clamp(min=1))


# --------------------------------------------------------------------------------------------
# Policy losses
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicyLossConfig:
    """`name` of a registered policy loss and its options.

    ``clip_eps_low`` / ``clip_eps_high``: the ratio is clipped to ``[1 - low, 1 + high]``; DAPO's
    clip-higher uses ``high = 0.28 > low = 0.2`` so low-probability tokens can grow (entropy does
    not collapse). ``clip_ratio_c`` (dual clip, e.g. 3.0): for negative advantages the loss is
    capped at ``-A * c`` so a huge ratio on a bad token cannot blow up the update; None disables.
    """

    name: str = "ppo_clip"
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    clip_ratio_c: float | None = None
    loss_agg_mode: str = "token_mean"

    def __post_init__(self) -> None:
        if not 0 <= self.clip_eps_low < 1:
            raise ValueError(f"clip_eps_low must be in [0, 1), got {self.clip_eps_low}")
        if self.clip_eps_high < 0:
            raise ValueError(f"clip_eps_high must be >= 0, got {self.clip_eps_high}")
        if self.clip_ratio_c is not None and self.clip_ratio_c <= 1:
            raise ValueError(f"clip_ratio_c (dual clip) must be > 1, e.g. 3.0, or None; got {self.clip_ratio_c}")
        if self.loss_agg_mode not in LOSS_AGG_MODES:
            raise ValueError(f"unknown loss_agg_mode {self.loss_agg_mode!r}; use one of {LOSS_AGG_MODES}")


class PolicyLossFn(Protocol):
    def __call__(
        self,
        logprobs: Tensor,
        old_logprobs: Tensor,
        advantages: Tensor,
        response_mask: Tensor,
        config: PolicyLossConfig,
        *,
        num_tokens: float | Tensor | None = None,
        num_seqs: float | Tensor | None = None,
    ) -> tuple[Tensor, dict[str, float]]: ...


_POLICY_LOSSES: dict[str, PolicyLossFn] = {}


def register_policy_loss(name: str) -> Callable[[PolicyLossFn], PolicyLossFn]:
    """Decorator registering a policy loss under `name` (names must be unique)."""

    def decorator(fn: PolicyLossFn) -> PolicyLossFn:
        if name in _POLICY_LOSSES and _POLICY_LOSSES[name] is not fn:
            raise ValueError(f"policy loss {name!r} is already registered; pick another name")
        _POLICY_LOSSES[name] = fn
        return fn

    return decorator


def known_policy_losses() -> list[str]:
    return sorted(_POLICY_LOSSES)


def get_policy_loss(name: str) -> PolicyLossFn:
    try:
        return _POLICY_LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown policy loss {name!r}; known: {sorted(_POLICY_LOSSES)}. "
                         "Register one with @register_policy_loss(name).") from None


@register_policy_loss("ppo_clip")
def ppo_clip_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    config: PolicyLossConfig = PolicyLossConfig(),
    *,
    num_tokens: float | Tensor | None = None,
    num_seqs: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """PPO clipped surrogate with asymmetric clipping and optional dual clip; all inputs [B, T].

    Per token, with ``ratio = exp(logprobs - old_logprobs)``::

        loss = max(-A * ratio, -A * clip(ratio, 1 - low, 1 + high))
        loss = min(loss, -A * c)        if A < 0 and dual clip is on

    Metrics: ``policy/loss`` (the returned loss) and token means over the mask, so a caller can
    combine micro-batches by weighting each with its token count: ``policy/clip_frac`` (the
    clipped branch was taken), ``policy/clip_frac_high`` / ``policy/clip_frac_low`` (clipped at
    the upper bound with A > 0 / at the lower bound with A < 0), ``policy/dual_clip_frac``,
    ``policy/approx_kl`` (``mean(old - new)``) and ``policy/ratio_mean``.
    """
    if not (logprobs.shape == old_logprobs.shape == advantages.shape == response_mask.shape):
        raise ValueError("logprobs, old_logprobs, advantages and response_mask must share one [B, T] shape, got "
                         f"{[tuple(t.shape) for t in (logprobs, old_logprobs, advantages, response_mask)]}")
    log_ratio = (logprobs - old_logprobs).clamp(-20.0, 20.0)  # exp stays finite on stale samples
    ratio = torch.exp(log_ratio)
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * ratio.clamp(1.0 - config.clip_eps_low, 1.0 + config.clip_eps_high)
    losses = torch.maximum(loss_unclipped, loss_clipped)
    dual_active = torch.zeros_like(losses, dtype=torch.bool)
    if config.clip_ratio_c is not None:
        loss_cap = -advantages * config.clip_ratio_c
        negative = advantages < 0
        dual_active = negative & (losses > loss_cap)
        losses = torch.where(negative, torch.minimum(losses, loss_cap), losses)
    loss = aggregate_loss(losses, response_mask, config.loss_agg_mode, num_tokens=num_tokens, num_seqs=num_seqs)

    with torch.no_grad():
        mask = response_mask.bool()
        ratio_d = ratio.detach()
        metrics = {
            "policy/loss": float(loss.detach()),
            "policy/clip_frac": _masked_mean((loss_clipped > loss_unclipped).float(), mask),
            "policy/clip_frac_high": _masked_mean(((advantages > 0) & (ratio_d > 1 + config.clip_eps_high)).float(),
                                                  mask),
            "policy/clip_frac_low": _masked_mean(((advantages < 0) & (ratio_d < 1 - config.clip_eps_low)).float(),
                                                 mask),
            "policy/dual_clip_frac": _masked_mean(dual_active.float(), mask),
            "policy/approx_kl": _masked_mean(-log_ratio.detach(), mask),
            "policy/ratio_mean": _masked_mean(ratio_d, mask),
        }
    return loss, metrics


def compute_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    config: PolicyLossConfig = PolicyLossConfig(),
    **normalizers: float | Tensor | None,
) -> tuple[Tensor, dict[str, float]]:
    """The registered loss ``config.name``; `normalizers` are ``num_tokens`` / ``num_seqs``."""
    return get_policy_loss(config.name)(logprobs, old_logprobs, advantages, response_mask, config, **normalizers)


# --------------------------------------------------------------------------------------------
# KL and entropy
# --------------------------------------------------------------------------------------------

KL_ESTIMATORS = ("k1", "abs", "k2", "mse", "k3", "low_var_kl")


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, kind: str = "k3") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from sampled tokens' log-probs (Schulman's k1/k2/k3).

    With ``d = logprobs - ref_logprobs``: ``k1 = d`` (unbiased, high variance, can be negative),
    ``abs = |d|``, ``k2 = mse = d^2 / 2``, ``k3 = low_var_kl = exp(-d) + d - 1`` (unbiased,
    non-negative, low variance; ``-d`` is clamped to [-20, 20] and the result to [-10, 10] so
    one far-off token cannot dominate, as in veRL).
    """
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(f"logprobs {tuple(logprobs.shape)} and ref_logprobs {tuple(ref_logprobs.shape)} differ")
    d = logprobs - ref_logprobs
    if kind == "k1":
        return d
    if kind == "abs":
        return d.abs()
    if kind in ("k2", "mse"):
        return 0.5 * d.square()
    if kind in ("k3", "low_var_kl"):
        neg = (-d).clamp(-20.0, 20.0)
        return (torch.exp(neg) - neg - 1).clamp(-10.0, 10.0)
    raise ValueError(f"unknown KL estimator {kind!r}; use one of {KL_ESTIMATORS}")


def kl_loss(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    response_mask: Tensor,
    kind: str = "k3",
    loss_agg_mode: str = "token_mean",
    **normalizers: float | Tensor | None,
) -> Tensor:
    """The aggregated KL penalty (GRPO's ``beta * KL`` term without beta)."""
    return aggregate_loss(kl_penalty(logprobs, ref_logprobs, kind), response_mask, loss_agg_mode, **normalizers)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) over the last dim: ``logsumexp(z) - sum(softmax(z) * z)``."""
    logits = logits.float()
    return torch.logsumexp(logits, dim=-1) - (torch.softmax(logits, dim=-1) * logits).sum(-1)


def aggregate_entropy(
    entropy: Tensor, response_mask: Tensor, loss_agg_mode: str = "token_mean", **normalizers: float | Tensor | None
) -> Tensor:
    """Per-token entropy [B, T] reduced like the policy loss (for a bonus term or a metric)."""
    return aggregate_loss(entropy, response_mask, loss_agg_mode, **normalizers)


# --------------------------------------------------------------------------------------------
# DAPO overlong shaping
# --------------------------------------------------------------------------------------------


def overlong_penalty(
    response_lengths: Tensor | Sequence[int],
    max_response_length: int,
    overlong_buffer_len: int,
    penalty_factor: float = 1.0,
) -> Tensor:
    """DAPO's soft overlong punishment, a reward term in ``[-penalty_factor, 0]`` per sequence [B].

    With ``L = max_response_length`` and ``C = overlong_buffer_len``::

        0                                  if len <= L - C
        (L - C - len) / C * penalty_factor if L - C < len <= L   (linear in the buffer)
        -penalty_factor                    if len > L

    Add it to the task reward before computing advantages.
    """
    if max_response_length < 1:
        raise ValueError(f"max_response_length must be >= 1, got {max_response_length}")
    if not 0 < overlong_buffer_len <= max_response_length:
        raise ValueError(f"overlong_buffer_len must be in 1..max_response_length ({max_response_length}), "
                         f"got {overlong_buffer_len}")
    if penalty_factor < 0:
        raise ValueError(f"penalty_factor must be >= 0, got {penalty_factor}")
    lengths = torch.as_tensor(response_lengths, dtype=torch.float32)
    excess = (lengths - (max_response_length - overlong_buffer_len)) / overlong_buffer_len
    return -excess.clamp(0.0, 1.0) * penalty_factor


# vLLM's finish reasons: "stop" (eos / stop string), "length" (hit max_tokens), "abort".
_FINISH_REASONS = {"stop": 1.0, "length": 0.0, "abort": 0.0}


def overlong_filter_mask(finish_reasons: Sequence[str]) -> Tensor:
    """Per-sequence loss mask [B]: 0 for truncated (``"length"``) or aborted responses, else 1.

    DAPO's overlong filtering: a truncated response's reward says nothing about its reasoning, so
    its tokens are left out of the loss. Use as ``response_mask * mask[:, None]``.
    """
    try:
        return torch.tensor([_FINISH_REASONS[r] for r in finish_reasons], dtype=torch.float32)
    except KeyError as e:
        raise ValueError(f"unknown finish reason {e.args[0]!r}; expected one of {sorted(_FINISH_REASONS)}") from None


@register_policy_loss("sft")
def sft_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    config: PolicyLossConfig = PolicyLossConfig(name="sft"),
    *,
    num_tokens: float | Tensor | None = None,
    num_seqs: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Negative log-likelihood of the response tokens (the supervised warm start runs the same
    worker with this loss); `old_logprobs` and `advantages` are ignored."""
    loss = aggregate_loss(-logprobs, response_mask, config.loss_agg_mode, num_tokens=num_tokens, num_seqs=num_seqs)
    return loss, {}
