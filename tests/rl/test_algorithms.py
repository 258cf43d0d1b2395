"""Advantages, policy losses, aggregation, KL / entropy and DAPO overlong shaping vs hand values and
independent float64 loop references."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from skyrl_mtp.config.schema import AlgorithmConfig
from skyrl_mtp.rl.advantages import (
    broadcast_to_tokens,
    compute_advantages,
    get_advantage_estimator,
    known_advantage_estimators,
    register_advantage_estimator,
)
from skyrl_mtp.rl.kl import aggregate_entropy, entropy_from_logits, kl_loss, kl_penalty
from skyrl_mtp.rl.policy_loss import (
    aggregate_loss,
    compute_policy_loss,
    get_policy_loss,
    known_policy_losses,
    ppo_clip_loss,
)
from skyrl_mtp.rl.shaping import overlong_filter_mask, overlong_penalty


def PolicyLossConfig(**kw):  # noqa: N802 (reads like the config it builds)
    return AlgorithmConfig(**{"clip_eps_high": 0.2, **kw})

# ---------------------------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------------------------


def test_grpo_hand_values():
    # Group 0: [1, 0, 0, 0]: mean 0.25, unbiased std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5.
    # Group 1: all equal -> 0.
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    adv = compute_advantages(rewards, group_size=4)
    expected = torch.tensor([1.5, -0.5, -0.5, -0.5, 0.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(adv, expected, rtol=1e-5, atol=1e-6)


def test_dr_grpo_does_not_divide_by_std():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0])
    adv = compute_advantages(rewards, group_size=4, norm_by_std=False)
    torch.testing.assert_close(adv, torch.tensor([0.75, -0.25, -0.25, -0.25]))


def test_rloo_hand_values():
    # r_i - mean of the others: 1 - 0 = 1, 0 - 1/3 = -1/3.
    adv = compute_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), group_size=4, estimator="rloo")
    torch.testing.assert_close(adv, torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3]))


def _grpo_reference(rewards, ids, norm_by_std, eps):
    out = []
    for r, g in zip(rewards, ids):
        members = [x for x, h in zip(rewards, ids) if h == g]
        if len(members) == 1:
            out.append(0.0)
            continue
        a = r - statistics.fmean(members)
        out.append(a / (statistics.stdev(members) + eps) if norm_by_std else a)
    return out


@pytest.mark.parametrize("norm_by_std", [True, False])
def test_grpo_matches_loop_reference_with_unordered_string_ids(norm_by_std):
    gen = torch.Generator().manual_seed(0)
    rewards = torch.rand(30, generator=gen, dtype=torch.float64)
    ids = [f"p{int(i)}" for i in torch.randint(0, 6, (30,), generator=gen)]
    ids[-1] = "lonely"  # a group of one gets advantage 0
    adv = compute_advantages(rewards, group_ids=ids, norm_by_std=norm_by_std, eps=1e-6)
    ref = torch.tensor(_grpo_reference(rewards.tolist(), ids, norm_by_std, 1e-6), dtype=torch.float64)
    torch.testing.assert_close(adv, ref)
    assert adv[-1] == 0


def test_advantage_argument_errors_and_registry():
    with pytest.raises(ValueError, match="exactly one"):
        compute_advantages(torch.ones(4))
    with pytest.raises(ValueError, match="divide"):
        compute_advantages(torch.ones(5), group_size=2)
    with pytest.raises(ValueError, match="group_ids has 3"):
        compute_advantages(torch.ones(4), group_ids=[0, 0, 1])
    assert {"grpo", "rloo"} <= set(known_advantage_estimators())
    with pytest.raises(ValueError, match=r"unknown advantage estimator 'ppo'.*'grpo'.*'rloo'"):
        get_advantage_estimator("ppo")
    with pytest.raises(ValueError, match="already registered"):
        register_advantage_estimator("grpo")(lambda r, i, c: r)


def test_broadcast_to_tokens():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    out = broadcast_to_tokens(torch.tensor([2.0, -1.0]), mask)
    torch.testing.assert_close(out, torch.tensor([[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]]))
    with pytest.raises(ValueError):
        broadcast_to_tokens(torch.ones(3), mask)


# ---------------------------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------------------------

VALUES = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0], [7.0, 7.0, 7.0]])
MASK = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])  # the last row is fully masked


@pytest.mark.parametrize("mode, expected", [
    ("token_mean", (1 + 2 + 3 + 4) / 4),
    ("seq_mean_token_sum", (6 + 4) / 2),
    ("seq_mean_token_mean", (2 + 4) / 2),
])
def test_aggregation_modes_hand_values(mode, expected):
    assert aggregate_loss(VALUES, MASK, mode).item() == pytest.approx(expected)


@pytest.mark.parametrize("mode, key", [("token_mean", "num_tokens"), ("seq_mean_token_sum", "num_seqs"),
                                       ("seq_mean_token_mean", "num_seqs")])
def test_micro_batches_sum_to_the_batch_loss(mode, key):
    total = 4.0 if key == "num_tokens" else 2.0
    parts = sum(aggregate_loss(VALUES[i:i + 1], MASK[i:i + 1], mode, **{key: total}) for i in range(3))
    assert parts.item() == pytest.approx(aggregate_loss(VALUES, MASK, mode).item())


def test_aggregation_all_masked_and_bad_mode():
    values = torch.ones(2, 3, requires_grad=True)
    loss = aggregate_loss(values, torch.zeros(2, 3), "token_mean")
    assert loss.item() == 0.0
    loss.backward()
    assert values.grad.abs().sum() == 0
    with pytest.raises(ValueError, match="unknown loss_agg_mode 'sum'"):
        aggregate_loss(VALUES, MASK, "sum")


# ---------------------------------------------------------------------------------------------
# PPO clip
# ---------------------------------------------------------------------------------------------


def _one_token(ratio: float, adv: float, cfg: PolicyLossConfig):
    logp = torch.tensor([[math.log(ratio)]], dtype=torch.float64, requires_grad=True)
    loss, metrics = ppo_clip_loss(logp, torch.zeros(1, 1, dtype=torch.float64),
                                  torch.tensor([[adv]], dtype=torch.float64), torch.ones(1, 1), cfg)
    loss.backward()
    return loss.item(), logp.grad.item(), metrics


@pytest.mark.parametrize("ratio, adv, expected, clipped", [
    (1.5, 1.0, -1.28, True),    # A > 0, above 1 + high: clipped at 1.28
    (1.25, 1.0, -1.25, False),  # inside [0.8, 1.28]
    (0.5, 1.0, -0.5, False),    # A > 0, ratio low: the pessimistic unclipped term
    (0.5, -1.0, 0.8, True),     # A < 0, below 1 - low: clipped at 0.8
    (1.5, -1.0, 1.5, False),    # A < 0, ratio high: unclipped (dual clip off)
])
def test_ppo_clip_hand_values(ratio, adv, expected, clipped):
    loss, grad, metrics = _one_token(ratio, adv, PolicyLossConfig(clip_eps_low=0.2, clip_eps_high=0.28))
    assert loss == pytest.approx(expected)
    # d(-A * ratio)/d logp = -A * ratio where unclipped; 0 where the clipped constant is taken.
    assert grad == pytest.approx(0.0 if clipped else -adv * ratio)
    assert metrics["policy/clip_frac"] == float(clipped)


def test_clip_higher_is_asymmetric():
    sym = PolicyLossConfig(clip_eps_low=0.2, clip_eps_high=0.2)
    dapo = PolicyLossConfig(clip_eps_low=0.2, clip_eps_high=0.28)
    # Positive advantage, ratio 1.25: clipped at 1.2 with symmetric eps, free under clip-higher.
    assert _one_token(1.25, 1.0, sym)[0] == pytest.approx(-1.2)
    assert _one_token(1.25, 1.0, dapo)[0] == pytest.approx(-1.25)
    assert _one_token(1.25, 1.0, sym)[2]["policy/clip_frac_high"] == 1.0
    assert _one_token(1.25, 1.0, dapo)[2]["policy/clip_frac_high"] == 0.0
    # Negative advantage, ratio 0.75: the lower bound is the same 0.8 in both.
    for cfg in (sym, dapo):
        loss, _, metrics = _one_token(0.75, -1.0, cfg)
        assert loss == pytest.approx(0.8) and metrics["policy/clip_frac_low"] == 1.0


def test_dual_clip_caps_negative_advantages_only():
    cfg = PolicyLossConfig(clip_eps_low=0.2, clip_eps_high=0.28, clip_ratio_c=3.0)
    loss, grad, metrics = _one_token(5.0, -1.0, cfg)
    assert loss == pytest.approx(3.0) and grad == 0.0 and metrics["policy/dual_clip_frac"] == 1.0
    assert _one_token(5.0, -1.0, PolicyLossConfig())[0] == pytest.approx(5.0)  # no dual clip
    assert _one_token(2.0, -1.0, cfg)[0] == pytest.approx(2.0)  # below c: untouched
    assert _one_token(5.0, 1.0, cfg)[0] == pytest.approx(-1.28)  # positive advantage: ordinary clip at 1 + high


def _ppo_reference(logp, old, adv, mask, low, high, c, mode):
    """Token-by-token float64 loop, written from the PPO / DAPO formulas."""
    per_seq, all_tokens = [], []
    for b in range(len(logp)):
        tokens = []
        for t in range(len(logp[b])):
            if not mask[b][t]:
                continue
            ratio = math.exp(logp[b][t] - old[b][t])
            a = adv[b][t]
            loss = max(-a * ratio, -a * min(max(ratio, 1 - low), 1 + high))
            if c is not None and a < 0:
                loss = min(loss, -a * c)
            tokens.append(loss)
        all_tokens += tokens
        if tokens:
            per_seq.append(sum(tokens) if mode == "seq_mean_token_sum" else statistics.fmean(tokens))
    if mode == "token_mean":
        return sum(all_tokens) / len(all_tokens)
    return statistics.fmean(per_seq)


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_sum", "seq_mean_token_mean"])
@pytest.mark.parametrize("clip_ratio_c", [None, 3.0])
def test_ppo_clip_matches_loop_reference(mode, clip_ratio_c):
    gen = torch.Generator().manual_seed(1)
    B, T = 5, 7
    old = -torch.rand(B, T, generator=gen, dtype=torch.float64) * 3
    logp = old + torch.randn(B, T, generator=gen, dtype=torch.float64) * 0.8  # many tokens outside the clip
    adv = broadcast_to_tokens(torch.randn(B, generator=gen, dtype=torch.float64) * 2, torch.ones(B, T))
    lengths = torch.tensor([7, 3, 1, 5, 0])
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    cfg = PolicyLossConfig(clip_eps_low=0.2, clip_eps_high=0.28, clip_ratio_c=clip_ratio_c, loss_agg_mode=mode)
    loss, metrics = compute_policy_loss(logp, old, adv, mask, cfg)
    ref = _ppo_reference(logp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), 0.2, 0.28, clip_ratio_c, mode)
    assert loss.item() == pytest.approx(ref, rel=1e-12)
    m = mask.bool()
    assert metrics["policy/approx_kl"] == pytest.approx((old - logp)[m].mean().item())
    assert metrics["policy/ratio_mean"] == pytest.approx(torch.exp(logp - old)[m].mean().item())
    assert 0 < metrics["policy/clip_frac"] < 1


def test_policy_loss_registry_and_config_errors():
    assert get_policy_loss("ppo_clip") is ppo_clip_loss
    assert "ppo_clip" in known_policy_losses()
    with pytest.raises(ValueError, match=r"unknown policy loss 'ppo'.*'gspo'.*'ppo_clip'"):
        get_policy_loss("ppo")
    with pytest.raises(ValueError, match="loss_agg_mode"):
        aggregate_loss(torch.zeros(2, 3), torch.ones(2, 3), "mean")
    with pytest.raises(ValueError, match="share one"):
        ppo_clip_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 2), torch.ones(2, 3), AlgorithmConfig())


# ---------------------------------------------------------------------------------------------
# KL and entropy
# ---------------------------------------------------------------------------------------------


def test_kl_estimators_hand_values():
    logp, ref = torch.tensor([[math.log(0.5)]]), torch.tensor([[math.log(0.25)]])
    d = math.log(2)
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(d)
    assert kl_penalty(ref, logp, "abs").item() == pytest.approx(d)
    assert kl_penalty(logp, ref, "k2").item() == pytest.approx(0.5 * d * d)
    assert kl_penalty(logp, ref, "mse").item() == pytest.approx(0.5 * d * d)
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx(0.5 + d - 1)  # q/p - log(q/p) - 1
    assert kl_penalty(logp, ref, "low_var_kl").item() == pytest.approx(0.5 + d - 1)
    # k3 is clamped to 10 when the reference is far more likely than the policy.
    assert kl_penalty(torch.tensor([-30.0]), torch.tensor([0.0]), "k3").item() == 10.0
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'"):
        kl_penalty(logp, ref, "k4")


def test_k1_and_k3_are_unbiased_estimates_of_the_exact_kl():
    # Expectation over tokens sampled from the policy = exact KL(p || q) for a categorical.
    p = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    q = torch.tensor([0.25, 0.25, 0.25, 0.25], dtype=torch.float64)
    exact = float((p * (p / q).log()).sum())
    for kind in ("k1", "k3"):
        expected = float((p * kl_penalty(p.log(), q.log(), kind)).sum())
        assert expected == pytest.approx(exact)


def test_kl_loss_aggregates():
    logp = torch.tensor([[0.0, -1.0], [-2.0, 0.0]])
    ref = torch.zeros(2, 2)
    mask = torch.tensor([[1, 1], [1, 0]])
    assert kl_loss(logp, ref, mask, "k1").item() == pytest.approx((0 - 1 - 2) / 3)
    assert kl_loss(logp, ref, mask, "k2", "seq_mean_token_sum").item() == pytest.approx((0.5 + 2.0) / 2)


def test_entropy():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [math.log(3), 0.0, -1e9, -1e9]]])
    ent = entropy_from_logits(logits)
    p = torch.tensor([0.75, 0.25])
    torch.testing.assert_close(ent, torch.tensor([[math.log(4), float(-(p * p.log()).sum())]]))
    assert aggregate_entropy(ent, torch.tensor([[1, 0]])).item() == pytest.approx(math.log(4))


# ---------------------------------------------------------------------------------------------
# DAPO overlong shaping
# ---------------------------------------------------------------------------------------------


def test_overlong_penalty_boundaries():
    # L = 20, buffer C = 4: free up to 16 tokens, linear to -1 at 20, -1 beyond.
    lengths = [0, 16, 17, 18, 20, 25]
    torch.testing.assert_close(overlong_penalty(lengths, 20, 4), torch.tensor([0.0, 0.0, -0.25, -0.5, -1.0, -1.0]))
    torch.testing.assert_close(overlong_penalty(torch.tensor([18, 20]), 20, 4, penalty_factor=0.5),
                               torch.tensor([-0.25, -0.5]))
    # Buffer = whole budget: the penalty grows from the first token.
    torch.testing.assert_close(overlong_penalty([0, 5, 10], 10, 10), torch.tensor([0.0, -0.5, -1.0]))


def test_overlong_penalty_errors():
    with pytest.raises(ValueError, match="overlong_buffer_len"):
        overlong_penalty([1], 10, 0)
    with pytest.raises(ValueError, match="overlong_buffer_len"):
        overlong_penalty([1], 10, 11)
    with pytest.raises(ValueError, match="penalty_factor"):
        overlong_penalty([1], 10, 2, penalty_factor=-1)


def test_overlong_filter_mask():
    torch.testing.assert_close(overlong_filter_mask(["stop", "length", "abort", "stop"]),
                               torch.tensor([1.0, 0.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="unknown finish reason 'eos'"):
        overlong_filter_mask(["eos"])
