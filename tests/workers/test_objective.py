"""The RL output processor's draft term: gathering the counted positions changes nothing but cost."""

from __future__ import annotations

import pytest
import torch

from skyrl_mtp.tools.check_policy_invariance import synthetic_batch
from skyrl_mtp.workers import objective
from skyrl_mtp.config.schema import AlgorithmConfig, MegatronConfig, MtpConfig, OptimConfig
from skyrl_mtp.workers.config import PolicyWorkerConfig
from skyrl_mtp.workers.policy import MegatronPolicy


@pytest.mark.parametrize("loss_type", ["soft_ce", "hard_ce"])
def test_gathered_positions_equal_the_full_projection(megatron_single, tiny_ckpt, monkeypatch, loss_type):
    cfg = PolicyWorkerConfig(model_path=str(tiny_ckpt), megatron=MegatronConfig(micro_batch_size=3),
                             optim=OptimConfig(lr=1e-3), algorithm=AlgorithmConfig(), temperature=0.9,
                             mtp=MtpConfig(enabled=True, num_speculative_tokens=2, loss_type=loss_type))
    batch = synthetic_batch(0, 300, 6, 24, 10)  # about half the positions count
    assert 0 < batch["loss_mask"].mean() < objective.GATHER_MAX_FRACTION
    results = {}
    for name, fraction in (("gathered", objective.GATHER_MAX_FRACTION), ("full", 0.0)):
        monkeypatch.setattr(objective, "GATHER_MAX_FRACTION", fraction)
        policy = MegatronPolicy(cfg)
        batch["old_logprobs"] = policy.compute_logprobs(batch)["logprobs"]
        _, draft_sums = policy.accumulate_gradients(batch)
        grads = {n: p.main_grad.clone() for n, p in policy.head.named_parameters()}
        results[name] = (draft_sums, grads)
    (draft_g, grads_g), (draft_f, grads_f) = results["gathered"], results["full"]
    for (sum_g, weight_g), (sum_f, weight_f) in zip(draft_g, draft_f):
        assert weight_g == weight_f > 0
        assert sum_g == pytest.approx(sum_f, rel=1e-5)
    for name in grads_f:
        assert grads_f[name].abs().sum() > 0, name
        torch.testing.assert_close(grads_g[name], grads_f[name], rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("loss_type", ["soft_ce", "tv"])
def test_fused_draft_loss_in_the_objective_equals_the_eager_one(megatron_single, tiny_ckpt, monkeypatch, loss_type):
    """The policy's draft term through the fused projection + loss (forced; on CPU only under
    Triton's interpreter) gives the eager path's per-depth losses and head gradients."""
    from skyrl_mtp.mtp.fused_loss import fused_available

    if not fused_available(torch.device("cpu")):
        pytest.skip("needs Triton's interpreter on CPU (TRITON_INTERPRET=1 with triton importable) or CUDA")
    cfg = PolicyWorkerConfig(model_path=str(tiny_ckpt), megatron=MegatronConfig(micro_batch_size=3),
                             optim=OptimConfig(lr=1e-3), algorithm=AlgorithmConfig(), temperature=0.9,
                             mtp=MtpConfig(enabled=True, num_speculative_tokens=2, loss_type=loss_type))
    batch = synthetic_batch(0, 300, 6, 24, 10)
    results = {}
    for name, fused in (("eager", False), ("fused", True)):
        policy = MegatronPolicy(cfg)
        monkeypatch.setattr(objective, "_use_fused", lambda draft, device, fused=fused: fused)
        batch["old_logprobs"] = policy.compute_logprobs(batch)["logprobs"]
        _, draft_sums = policy.accumulate_gradients(batch)
        results[name] = (draft_sums, {n: p.main_grad.clone() for n, p in policy.head.named_parameters()})
    (draft_e, grads_e), (draft_f, grads_f) = results["eager"], results["fused"]
    for (sum_e, weight_e), (sum_f, weight_f) in zip(draft_e, draft_f):
        assert weight_e == weight_f > 0
        assert sum_f == pytest.approx(sum_e, rel=1e-5)
    for name in grads_e:
        assert grads_e[name].abs().sum() > 0, name
        torch.testing.assert_close(grads_f[name], grads_e[name], rtol=1e-4, atol=1e-6, msg=name)
