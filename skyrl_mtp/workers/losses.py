"""Per-token policy-loss and KL functions the RL objective calls (resolved from the config)."""

from __future__ import annotations

from typing import Callable

import torch

from skyrl_mtp.workers.config import PolicyLossConfig


def ppo_clip_per_token(logprobs, old_logprobs, advantages, mask, *, clip_eps_low: float, clip_eps_high: float,
                       clip_ratio_c: float | None = None):
    """Clipped surrogate per token, with DAPO's clip-higher (separate low/high eps) and optional dual clip.

    Returns (per-token loss [b, s], token-summed metrics over `mask`).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps_low, 1.0 + clip_eps_high)
    loss = torch.maximum(unclipped, clipped)
    m = mask.to(loss.dtype)
    metrics = {"policy/clip_frac": ((clipped > unclipped).to(loss.dtype) * m).sum().detach(),
               "policy/approx_kl": ((-log_ratio).detach() * m).sum()}
    if clip_ratio_c is not None:
        dual = torch.minimum(loss, -advantages * clip_ratio_c)
        use_dual = advantages < 0
        metrics["policy/dual_clip_frac"] = (((loss > -advantages * clip_ratio_c) & use_dual).to(loss.dtype) * m).sum().detach()
        loss = torch.where(use_dual, dual, loss)
    return loss, metrics


def make_policy_loss_fn(cfg: PolicyLossConfig) -> Callable:
    if cfg.policy_loss != "ppo_clip":
        raise ValueError(f"unknown policy_loss {cfg.policy_loss!r}; known: ['ppo_clip']")

    def fn(logprobs, old_logprobs, advantages, mask):
        return ppo_clip_per_token(logprobs, old_logprobs, advantages, mask, clip_eps_low=cfg.clip_eps_low,
                                  clip_eps_high=cfg.clip_eps_high, clip_ratio_c=cfg.clip_ratio_c)

    return fn


def kl_function(name: str) -> Callable:
    def k1(lp, ref):
        return lp - ref

    def mse(lp, ref):
        return 0.5 * (lp - ref) ** 2

    def low_var_kl(lp, ref):
        d = (ref - lp).clamp(-20, 20)
        return (d.exp() - d - 1).clamp(-10, 10)

    table = {"k1": k1, "k2": mse, "mse": mse, "k3": low_var_kl, "low_var_kl": low_var_kl}
    if name not in table:
        raise ValueError(f"unknown kl_type {name!r}; known: {sorted(table)}")
    return table[name]
