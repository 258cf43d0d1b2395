"""GSPO and truncated importance sampling against float64 loop references and hand values; the
aggregation's global normalisers used as given (DP shards with fewer sequences than ranks)."""

from __future__ import annotations

import math

import pytest
import torch

from skyrl_mtp.config.schema import AlgorithmConfig, GspoConfig
from skyrl_mtp.rl.policy_loss import aggregate_loss, compute_policy_loss
from skyrl_mtp.rl.tis import mismatch_stats, truncated_is_weights


def _gspo_reference(logp, old, adv, mask, low, high):
    """Sequence-level GSPO objective in plain float loops: per sequence
    s = exp(mean over its tokens of (logp - old)), loss_i = max(-A s, -A clip(s)), mean over
    sequences with tokens (seq_mean_token_mean)."""
    losses = []
    for lp_row, old_row, a_row, m_row in zip(logp, old, adv, mask):
        toks = [(lp, o) for lp, o, m in zip(lp_row, old_row, m_row) if m]
        if not toks:
            continue
        s = math.exp(sum(lp - o for lp, o in toks) / len(toks))
        a = a_row[0]
        losses.append(max(-a * s, -a * min(max(s, 1 - low), 1 + high)))
    return sum(losses) / len(losses)


def test_gspo_matches_sequence_level_reference_and_its_gradient():
    gen = torch.Generator().manual_seed(0)
    b, t = 6, 7
    old = -torch.rand(b, t, generator=gen, dtype=torch.float64) * 3
    noise = torch.randn(b, t, generator=gen, dtype=torch.float64) * 1e-2
    noise[3] *= 0.01  # one sequence stays inside GSPO's tight clip range
    logp = (old + noise).requires_grad_(True)
    adv = torch.randn(b, 1, generator=gen, dtype=torch.float64).expand(b, t).contiguous()
    mask = (torch.rand(b, t, generator=gen) > 0.3).double()
    mask[-1] = 0  # a sequence with no tokens does not count
    cfg = AlgorithmConfig(policy_loss="gspo", loss_agg_mode="seq_mean_token_mean",
                          gspo=GspoConfig(clip_eps_low=3e-4, clip_eps_high=4e-4))
    loss, metrics = compute_policy_loss(logp, old, adv, mask, cfg)
    ref = _gspo_reference(logp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), 3e-4, 4e-4)
    assert loss.item() == pytest.approx(ref, rel=1e-12)
    assert 0 < metrics["policy/clip_frac"] < 1  # some sequences clipped at this tight range, not all
    # The gradient is the sequence-level one: d/dlogp of the reference by finite differences.
    loss.backward()
    eps = 1e-7
    for i, j in [(0, 0), (3, 1), (3, 2), (3, 5), (4, 6)]:
        if not mask[i, j]:
            continue
        bumped = logp.detach().clone()
        bumped[i, j] += eps
        numeric = (_gspo_reference(bumped.tolist(), old.tolist(), adv.tolist(), mask.tolist(), 3e-4, 4e-4) - ref) / eps
        assert logp.grad[i, j].item() == pytest.approx(numeric, rel=1e-4, abs=1e-9)
    assert torch.all(logp.grad[mask == 0] == 0)


def test_gspo_differs_from_token_level_ppo():
    gen = torch.Generator().manual_seed(1)
    old = -torch.rand(4, 5, generator=gen, dtype=torch.float64)
    logp = old + torch.randn(4, 5, generator=gen, dtype=torch.float64) * 0.3
    adv = torch.tensor([[1.0], [-1.0], [0.5], [-0.5]], dtype=torch.float64).expand(4, 5)
    mask = torch.ones(4, 5, dtype=torch.float64)
    ppo, _ = compute_policy_loss(logp, old, adv, mask, AlgorithmConfig(loss_agg_mode="seq_mean_token_mean"))
    gspo, _ = compute_policy_loss(logp, old, adv, mask, AlgorithmConfig(policy_loss="gspo",
                                                                        loss_agg_mode="seq_mean_token_mean"))
    assert abs(ppo.item() - gspo.item()) > 1e-3


def test_tis_weights_hand_values():
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -1.0]])
    rollout = torch.tensor([[-1.5, -1.0, -0.5], [-1.2, -1.1, -5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    token = truncated_is_weights(old, rollout, mask, mode="token", cap=1.5)
    expected = torch.tensor([[min(math.exp(0.5), 1.5), math.exp(-1.0), 1.0], [math.exp(0.2), math.exp(0.1), 0.0]])
    torch.testing.assert_close(token, expected)
    seq = truncated_is_weights(old, rollout, mask, mode="sequence", cap=10.0)
    row0, row1 = math.exp(0.5 - 1.0 + 0.0), math.exp(0.2 + 0.1)  # the masked token is left out
    torch.testing.assert_close(seq, torch.tensor([[row0] * 3, [row1, row1, 0.0]]))
    capped = truncated_is_weights(old, rollout, mask, mode="sequence", cap=1.2)
    assert capped[1, 0].item() == pytest.approx(1.2)
    sums, maxima = mismatch_stats(old, rollout, mask, token, 1.5)
    assert sums["rollout/logprob_abs_diff"].item() == pytest.approx(0.5 + 1.0 + 0.0 + 0.2 + 0.1)
    assert sums["rollout/tis_capped_frac"].item() == 1.0  # the first token hit the cap
    assert maxima["rollout/logprob_abs_diff_max"].item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown TIS mode"):
        truncated_is_weights(old, rollout, mask, mode="batch", cap=2.0)


def test_tis_weights_scale_the_per_token_loss_and_are_one_when_sides_agree():
    gen = torch.Generator().manual_seed(2)
    old = -torch.rand(3, 4, generator=gen, dtype=torch.float64)
    logp = (old + 0.05 * torch.randn(3, 4, generator=gen, dtype=torch.float64)).requires_grad_(True)
    adv = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    mask = torch.ones(3, 4, dtype=torch.float64)
    cfg = AlgorithmConfig()
    plain, _ = compute_policy_loss(logp, old, adv, mask, cfg)
    agree = truncated_is_weights(old, old.clone(), mask, mode="token", cap=2.0)
    same, _ = compute_policy_loss(logp, old, adv, mask, cfg, token_weights=agree)
    assert same.item() == plain.item()
    rollout = old - 0.3 * torch.rand(3, 4, generator=gen, dtype=torch.float64)  # the engine was less sure
    w = truncated_is_weights(old, rollout, mask, mode="token", cap=2.0)
    weighted, _ = compute_policy_loss(logp, old, adv, mask, cfg, token_weights=w)
    ratio = torch.exp(logp.detach() - old)
    per_token = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.28)) * torch.exp(old - rollout).clamp(max=2.0)
    assert weighted.item() == pytest.approx(per_token.mean().item(), rel=1e-12)
    assert abs(weighted.item() - plain.item()) > 1e-4


@pytest.mark.parametrize("mode, key", [("token_mean", "num_tokens"), ("seq_mean_token_mean", "num_seqs")])
def test_global_normaliser_below_one_is_used_as_given(mode, key):
    # Two DP ranks, one valid sequence in all: rank 0 holds it, rank 1 only padding. Each rank
    # divides by (global count / dp_size) = 0.5 (tokens 3 / 2 = 1.5 for token_mean), and DDP
    # averages: the mean of the two ranks' losses must be the DP=1 loss.
    values = torch.tensor([[1.0, 2.0, 3.0]])
    mask = torch.ones(1, 3)
    single = aggregate_loss(values, mask, mode)
    global_count = 3.0 if mode == "token_mean" else 1.0
    rank0 = aggregate_loss(values, mask, mode, **{key: global_count / 2})
    rank1 = aggregate_loss(torch.zeros(1, 3), torch.zeros(1, 3), mode, **{key: global_count / 2})
    assert ((rank0 + rank1) / 2).item() == pytest.approx(single.item())
