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


def test_acceptance_weighted_depths_follow_a_float64_reference(megatron_single, tiny_ckpt, monkeypatch):
    """trainer.mtp.depth_weighting=acceptance: depth 1 is the uniform mean; depth 2 weighs each
    position t by 1 - TV(p_1(t), q_1(t)) of depth 1 (p: policy, q: head, both at T), recomputed
    here in float64 from the logits the uniform run hands to the loss."""
    monkeypatch.setattr(objective, "GATHER_MAX_FRACTION", 0.0)  # full [b, s] path: positions line up
    temperature = 0.9
    batch = synthetic_batch(0, 300, 6, 24, 10)
    recorded = []
    real_draft_loss = objective.draft_loss

    def spy(student, teacher, mask, **kwargs):
        recorded.append((student.detach().double(), teacher.double(), mask.double()))
        return real_draft_loss(student, teacher, mask, **kwargs)

    results = {}
    for weighting in ("uniform", "acceptance"):
        cfg = PolicyWorkerConfig(model_path=str(tiny_ckpt), megatron=MegatronConfig(micro_batch_size=6),
                                 optim=OptimConfig(lr=1e-3), algorithm=AlgorithmConfig(), temperature=temperature,
                                 mtp=MtpConfig(enabled=True, num_speculative_tokens=2, loss_type="tv",
                                               depth_weighting=weighting))
        policy = MegatronPolicy(cfg)
        batch["old_logprobs"] = policy.compute_logprobs(batch)["logprobs"]
        if weighting == "uniform":
            monkeypatch.setattr(objective, "draft_loss", spy)
        _, draft_sums = policy.accumulate_gradients(batch)
        monkeypatch.setattr(objective, "draft_loss", real_draft_loss)
        results[weighting] = (draft_sums, {n: p.main_grad.clone() for n, p in policy.head.named_parameters()})
    (student1, teacher1, mask1), (student2, teacher2, mask2) = recorded  # one micro-batch, two depths
    tv = lambda s, t: 0.5 * (torch.softmax(t / temperature, -1) - torch.softmax(s / temperature, -1)).abs().sum(-1)  # noqa: E731
    accept1 = 1.0 - tv(student1, teacher1)  # [b, seq - 1]
    weights2 = mask2 * accept1[:, : mask2.shape[1]]
    expected_sum2 = (weights2 * tv(student2, teacher2)).sum()
    (uni1, uni2), (acc1, acc2) = results["uniform"][0], results["acceptance"][0]
    assert acc1 == uni1  # depth 1 untouched
    assert acc2[1] == pytest.approx(weights2.sum().item(), rel=1e-5)
    assert acc2[0] == pytest.approx(expected_sum2.item(), rel=1e-5)
    assert uni2[0] == pytest.approx((mask2 * tv(student2, teacher2)).sum().item(), rel=1e-5)
    assert 0 < weights2.sum() < mask2.sum()  # the weighting does something
    grads_u, grads_a = results["uniform"][1], results["acceptance"][1]
    assert any(not torch.equal(grads_u[n], grads_a[n]) for n in grads_u)
