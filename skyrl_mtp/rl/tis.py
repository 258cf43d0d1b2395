"""Off-policy correction against the rollout engine's log-probs (pure torch).

The engine (vLLM, bf16 kernels, speculative decoding) and the trainer (Megatron) compute slightly
different distributions for the same weights, so the rollout was sampled from ``pi_rollout``
while the loss treats it as sampled from ``pi_old`` (the trainer at the rollout's weights).
Truncated importance sampling (TIS) reweights each token's policy loss by
``min(pi_old / pi_rollout, cap)``, per token (``mode="token"``) or with one weight per sequence
(``mode="sequence"``: the product of the token ratios). The mismatch metrics are worth
watching with TIS off too: they show when the two sides disagree.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

TIS_MODES = ("token", "sequence")


def truncated_is_weights(old_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor, *, mode: str,
                         cap: float) -> Tensor:
    """Detached per-token weights ``[B, T]``: ``min(exp(old - rollout), cap)`` per token, or per
    sequence ``min(exp(sum_t (old - rollout)), cap)`` broadcast over its tokens; 0 off the mask."""
    if mode not in TIS_MODES:
        raise ValueError(f"unknown TIS mode {mode!r}; use one of {TIS_MODES}")
    if cap <= 0:
        raise ValueError(f"TIS cap must be > 0, got {cap}")
    mask = mask.to(old_logprobs.dtype)
    log_ratio = (old_logprobs - rollout_logprobs).detach() * mask
    if mode == "sequence":
        log_ratio = log_ratio.sum(-1, keepdim=True).expand_as(mask)
    # min(exp(x), cap) = exp(min(x, log cap)): no overflow however far the two sides drift
    return torch.exp(log_ratio.clamp(max=math.log(cap))) * mask


def mismatch_stats(old_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor, weights: Tensor | None,
                   cap: float | None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Token sums and maxima describing trainer vs rollout log-probs on the masked tokens:
    ``(sums, maxima)``; divide the sums by the token count after reducing over micro-batches and
    ranks. Sums: ``|diff|``, the token IS ratio ``exp(old - rollout)``, and (with TIS weights)
    the tokens whose weight hit the cap. Maxima: ``|diff|``."""
    mask = mask.to(old_logprobs.dtype)
    diff = (old_logprobs - rollout_logprobs).detach()
    abs_diff = diff.abs() * mask
    sums = {"rollout/logprob_abs_diff": abs_diff.sum(),
            "rollout/is_ratio": (torch.exp(diff.clamp(-20.0, 20.0)) * mask).sum()}
    if weights is not None and cap is not None:
        sums["rollout/tis_capped_frac"] = ((weights >= cap * (1 - 1e-6)) * mask).sum()
    return sums, {"rollout/logprob_abs_diff_max": abs_diff.max() if abs_diff.numel() else abs_diff.sum()}
