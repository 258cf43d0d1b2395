"""KL estimators between the policy and a reference from sampled tokens' log-probs, and entropy
helpers (pure torch)."""

from __future__ import annotations

import torch
from torch import Tensor

from skyrl_mtp.rl.policy_loss import aggregate_loss


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


