"""Policy losses (pure torch): loss aggregation, the policy-loss registry with ``ppo_clip``
(asymmetric DAPO clip-higher, optional dual clip), ``gspo`` (sequence-level ratio with its own
clipping) and ``sft`` (the warm start's negative log-likelihood).

All losses take per-token tensors ``[B, T]`` (``response_mask`` 1 on tokens that count) and the
run's :class:`~skyrl_mtp.config.schema.AlgorithmConfig`, which is where every loss setting is
declared. Each loss is written per token and wrapped by :func:`aggregated`, which multiplies the
per-token losses by ``token_weights`` (detached, e.g. truncated importance-sampling weights from
:mod:`skyrl_mtp.rl.tis`) and reduces them with :func:`aggregate_loss`.
"""

from __future__ import annotations

import functools
from typing import Callable, Protocol

import torch
from torch import Tensor

from skyrl_mtp.config.schema import AlgorithmConfig

LOSS_AGG_MODES = ("token_mean", "seq_mean_token_sum", "seq_mean_token_mean")


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
    the sequence means. When a batch is split into micro-batches or data-parallel shards, pass
    the whole batch's `num_tokens` (token_mean) or `num_seqs` (seq modes), divided by the DP
    size where DDP averages gradients: these are used as given, even below 1 (a DP rank may
    hold fewer valid sequences than there are ranks), so the shards' losses sum to the batch
    loss. Only a count computed here from an all-masked `mask` is raised to 1 (loss 0, not NaN).
    """
    if values.shape != mask.shape or values.dim() != 2:
        raise ValueError(f"values and mask must both be [B, T], got {tuple(values.shape)} and {tuple(mask.shape)}")
    mask = mask.to(values.dtype)
    if mode == "token_mean":
        return (values * mask).sum() / _denominator(mask.sum() if num_tokens is None else num_tokens, values)
    seq_tokens = mask.sum(-1)
    seq_valid = (seq_tokens > 0).to(values.dtype)
    if mode == "seq_mean_token_sum":
        per_seq = (values * mask).sum(-1)
    elif mode == "seq_mean_token_mean":
        per_seq = (values * mask).sum(-1) / seq_tokens.clamp(min=1)
    else:
        raise ValueError(f"unknown loss_agg_mode {mode!r}; use one of {LOSS_AGG_MODES}")
    return (per_seq * seq_valid).sum() / _denominator(seq_valid.sum() if num_seqs is None else num_seqs, values)


def _denominator(denom: float | Tensor, like: Tensor) -> Tensor:
    denom = torch.as_tensor(denom, dtype=like.dtype, device=like.device)
    # Nothing counts anywhere: the numerator is 0 too; give loss 0 (still in the graph), not NaN.
    return torch.where(denom > 0, denom, torch.ones_like(denom))


def masked_mean(values: Tensor, mask: Tensor) -> float:
    mask = mask.to(values.dtype)
    return float((values * mask).sum() / mask.sum().clamp(min=1))


# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------


class PolicyLossFn(Protocol):
    def __call__(
        self,
        logprobs: Tensor,
        old_logprobs: Tensor,
        advantages: Tensor,
        response_mask: Tensor,
        config: AlgorithmConfig,
        *,
        token_weights: Tensor | None = None,
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


def compute_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    config: AlgorithmConfig,
    **kwargs,
) -> tuple[Tensor, dict[str, float]]:
    """The registered loss ``config.policy_loss``; `kwargs` are ``token_weights`` and the
    normalizers ``num_tokens`` / ``num_seqs``."""
    return get_policy_loss(config.policy_loss)(logprobs, old_logprobs, advantages, response_mask, config, **kwargs)


def _check_shapes(*tensors: Tensor) -> None:
    if len({tuple(t.shape) for t in tensors}) != 1:
        raise ValueError("logprobs, old_logprobs, advantages and response_mask must share one [B, T] shape, got "
                         f"{[tuple(t.shape) for t in tensors]}")


TokenLossFn = Callable[[Tensor, Tensor, Tensor, Tensor, AlgorithmConfig], tuple[Tensor, dict[str, float]]]


def aggregated(token_loss: TokenLossFn) -> PolicyLossFn:
    """Turns a per-token loss ``(logprobs, old_logprobs, advantages, response_mask, config) ->
    (losses [B, T], metrics)`` into a :class:`PolicyLossFn`: the losses are multiplied by the
    detached ``token_weights`` and reduced by :func:`aggregate_loss` with ``config.loss_agg_mode``
    and the given ``num_tokens`` / ``num_seqs``."""

    @functools.wraps(token_loss)
    def policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, response_mask: Tensor,
                    config: AlgorithmConfig, *, token_weights: Tensor | None = None,
                    num_tokens: float | Tensor | None = None,
                    num_seqs: float | Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
        losses, metrics = token_loss(logprobs, old_logprobs, advantages, response_mask, config)
        if token_weights is not None:
            losses = losses * token_weights.detach()
        loss = aggregate_loss(losses, response_mask, config.loss_agg_mode, num_tokens=num_tokens, num_seqs=num_seqs)
        return loss, metrics

    return policy_loss


def _clipped_surrogate(ratio: Tensor, logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor,
                       response_mask: Tensor, low: float, high: float) -> tuple[Tensor, dict[str, float]]:
    """Per-token ``max(-A * ratio, -A * clip(ratio, 1 - low, 1 + high))`` and its token-mean
    metrics: ``policy/clip_frac`` (the clipped branch was taken), ``policy/clip_frac_high`` /
    ``_low`` (clipped at the upper bound with A > 0 / the lower with A < 0), ``policy/approx_kl``
    (``mean(old - new)``) and ``policy/ratio_mean``."""
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - low, 1.0 + high)
    with torch.no_grad():
        mask = response_mask.bool()
        r = ratio.detach()
        metrics = {
            "policy/clip_frac": masked_mean((clipped > unclipped).float(), mask),
            "policy/clip_frac_high": masked_mean(((advantages > 0) & (r > 1 + high)).float(), mask),
            "policy/clip_frac_low": masked_mean(((advantages < 0) & (r < 1 - low)).float(), mask),
            "policy/approx_kl": masked_mean((old_logprobs - logprobs).detach(), mask),
            "policy/ratio_mean": masked_mean(r, mask),
        }
    return torch.maximum(unclipped, clipped), metrics


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


@register_policy_loss("ppo_clip")
@aggregated
def ppo_clip_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, response_mask: Tensor,
                  config: AlgorithmConfig) -> tuple[Tensor, dict[str, float]]:
    """PPO clipped surrogate with asymmetric clipping and optional dual clip; all inputs [B, T].

    Per token, with ``ratio = exp(logprobs - old_logprobs)``::

        loss = max(-A * ratio, -A * clip(ratio, 1 - low, 1 + high))
        loss = min(loss, -A * c)        if A < 0 and dual clip is on

    ``low`` / ``high`` are ``config.clip_eps_low`` / ``clip_eps_high`` (DAPO's clip-higher: 0.2 /
    0.28, so low-probability tokens can grow); ``c`` is ``config.clip_ratio_c`` (None: off).
    Metrics are token means over the mask, so a caller can combine micro-batches by weighting
    each with its token count: ``policy/clip_frac`` (the clipped branch was taken),
    ``policy/clip_frac_high`` / ``policy/clip_frac_low`` (clipped at the upper bound with A > 0 /
    at the lower bound with A < 0), ``policy/dual_clip_frac``, ``policy/approx_kl``
    (``mean(old - new)``) and ``policy/ratio_mean``.
    """
    _check_shapes(logprobs, old_logprobs, advantages, response_mask)
    ratio = torch.exp((logprobs - old_logprobs).clamp(-20.0, 20.0))  # exp stays finite on stale samples
    losses, metrics = _clipped_surrogate(ratio, logprobs, old_logprobs, advantages, response_mask,
                                         config.clip_eps_low, config.clip_eps_high)
    dual_active = torch.zeros_like(losses, dtype=torch.bool)
    if config.clip_ratio_c is not None:
        loss_cap = -advantages * config.clip_ratio_c
        negative = advantages < 0
        dual_active = negative & (losses > loss_cap)
        losses = torch.where(negative, torch.minimum(losses, loss_cap), losses)
    metrics["policy/dual_clip_frac"] = masked_mean(dual_active.float(), response_mask.bool())
    return losses, metrics


@register_policy_loss("gspo")
@aggregated
def gspo_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, response_mask: Tensor,
              config: AlgorithmConfig) -> tuple[Tensor, dict[str, float]]:
    """GSPO (Group Sequence Policy Optimization): the importance ratio of a whole sequence,
    length-normalised, ``s_i = exp(mean_t(logprobs - old_logprobs))`` over its response tokens,
    clipped to ``[1 - gspo.clip_eps_low, 1 + gspo.clip_eps_high]`` (GSPO's own, much tighter
    range, e.g. 3e-4 / 4e-4). In the token form the ratio of token t is
    ``sg[s_i] * exp(logprobs_t - sg[logprobs_t])``: its value is ``s_i`` and its gradient is
    ``s_i`` times the token's log-prob gradient, so with one advantage per sequence this is the
    sequence-level objective. Aggregated by ``config.loss_agg_mode`` (GSPO's paper:
    ``seq_mean_token_mean``). Metrics as ``ppo_clip``'s, token-weighted (``policy/clip_frac`` is
    then the share of tokens in clipped sequences).
    """
    _check_shapes(logprobs, old_logprobs, advantages, response_mask)
    mask = response_mask.to(logprobs.dtype)
    seq_tokens = mask.sum(-1, keepdim=True).clamp(min=1)
    seq_log_ratio = (((logprobs - old_logprobs) * mask).sum(-1, keepdim=True) / seq_tokens).clamp(-20.0, 20.0)
    ratio = torch.exp(seq_log_ratio.detach() + logprobs - logprobs.detach())  # value: s_i; grad: s_i * dlogp_t
    losses, metrics = _clipped_surrogate(ratio, logprobs, old_logprobs, advantages, response_mask,
                                         config.gspo.clip_eps_low, config.gspo.clip_eps_high)
    return losses, metrics


@register_policy_loss("sft")
@aggregated
def sft_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, response_mask: Tensor,
             config: AlgorithmConfig) -> tuple[Tensor, dict[str, float]]:
    """Negative log-likelihood of the response tokens (the supervised warm start runs the same
    worker with this loss); `old_logprobs` and `advantages` are ignored."""
    return -logprobs, {}
