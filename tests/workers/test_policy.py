"""The Megatron policy worker on CPU: decoupling (bitwise), gradient isolation, checkpoints, bad input."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from skyrl_mtp.tools.check_policy_invariance import main as invariance, synthetic_batch
from skyrl_mtp.config.schema import AlgorithmConfig, MegatronConfig, MtpConfig, OptimConfig
from skyrl_mtp.workers.config import PolicyWorkerConfig
from skyrl_mtp.workers.policy import MegatronPolicy


def _cfg(path, **mtp) -> PolicyWorkerConfig:
    return PolicyWorkerConfig(model_path=str(path), megatron=MegatronConfig(micro_batch_size=3),
                              optim=OptimConfig(lr=1e-3), temperature=0.9,
                              algorithm=AlgorithmConfig(clip_eps_low=0.2, clip_eps_high=0.28),
                              mtp=MtpConfig(**{"enabled": True, "optim": OptimConfig(lr=3e-3), **mtp}))


def _batch(policy, step=0):
    batch = synthetic_batch(step, 300, 6, 20, 6)
    batch["old_logprobs"] = policy.compute_logprobs(batch)["logprobs"] + 0.01 * torch.randn(6, 20)
    return batch


@pytest.mark.parametrize("loss_type", ["soft_ce", "topk_soft_ce", "hard_ce", "tv"])
def test_invariance_tool_reports_identical_and_draft_loss_falls(megatron_single, tiny_ckpt, loss_type):
    report = invariance(["--steps", "3", "--mini-batches", "4", "--loss-type", loss_type, "--model", str(tiny_ckpt),
                         "--head-lr", "1e-2", "--num-depths", "2", "--chunk-size", "7"])
    assert report["optimizer_steps"] == 12  # 3 rollout batches x 4 PPO mini-batches
    assert report["identical"] is True and report["max_abs_diff"] == 0.0
    assert report["mtp_loss_last"] < report["mtp_loss_first"]


def test_invariance_tool_catches_a_leak(megatron_single, tiny_ckpt):
    report = invariance(["--steps", "2", "--model", str(tiny_ckpt), "--attach-output-layer"])
    assert report["identical"] is False and report["max_abs_diff"] > 0


def test_gradient_isolation(megatron_single, tiny_ckpt):
    on = MegatronPolicy(_cfg(tiny_ckpt, num_speculative_tokens=2))
    off = MegatronPolicy(replace(_cfg(tiny_ckpt), mtp=MtpConfig(enabled=False)))
    batch = _batch(off)
    on.accumulate_gradients(batch)
    off.accumulate_gradients(batch)
    on_grads = {n: p.main_grad.clone() for n, p in on.trunk.named_parameters()}
    off_grads = {n: p.main_grad.clone() for n, p in off.trunk.named_parameters()}
    assert on_grads.keys() == off_grads.keys()
    for name in on_grads:
        assert torch.equal(on_grads[name], off_grads[name]), name
    for name, p in on.head.named_parameters():
        assert p.main_grad.abs().sum() > 0, f"MTP parameter {name} got no gradient"
    # The policy optimizer holds exactly the trunk's parameters, the head optimizer the head's.
    trunk_ids = {id(p) for p in on.trunk.parameters()}
    head_ids = {id(p) for p in on.head.parameters()}
    opt_trunk = {id(p) for g in on.trunk_opt.param_groups for p in g["params"]}
    opt_head = {id(p) for g in on.head_opt.param_groups for p in g["params"]}
    assert opt_trunk == trunk_ids and opt_head == head_ids


def test_reported_grad_norms_match_the_gradients(megatron_single, tiny_ckpt):
    # Reference: the float64 L2 norm of the accumulated main grads, taken before the step.
    # (megatron-core 0.19 clips MTP parameters as their own grad-norm group; the head's norm
    # must still be reported, not the 0 that step() returns for an optimizer without others.)
    policy = MegatronPolicy(_cfg(tiny_ckpt, num_speculative_tokens=2))
    sums, draft_sums = policy.accumulate_gradients(_batch(policy))

    def l2(module):
        return sum(p.main_grad.double().pow(2).sum() for p in module.parameters()).sqrt().item()

    trunk_norm, head_norm = l2(policy.trunk), l2(policy.head)
    metrics = policy.apply_gradients(sums, draft_sums)
    assert head_norm > 0 and trunk_norm > 0
    assert metrics["mtp/grad_norm"] == pytest.approx(head_norm, rel=1e-4)
    assert metrics["policy/grad_norm"] == pytest.approx(trunk_norm, rel=1e-4)


def test_checkpoint_resume_is_bitwise(megatron_single, tiny_ckpt, tmp_path):
    cfg = _cfg(tiny_ckpt)
    straight = MegatronPolicy(cfg)
    batches = [_batch(straight, s) for s in range(4)]
    for b in batches:
        straight.train_step(b)

    first = MegatronPolicy(cfg)
    for b in batches[:2]:
        first.train_step(b)
    first.save_checkpoint(tmp_path)
    resumed = MegatronPolicy(cfg)
    resumed.load_checkpoint(tmp_path)
    assert resumed.step == 2
    for b in batches[2:]:
        resumed.train_step(b)
    for name, tensor in straight.policy_state().items():
        assert torch.equal(tensor, resumed.policy_state()[name]), name
    for (n1, p1), (_, p2) in zip(straight.head.named_parameters(), resumed.head.named_parameters()):
        assert torch.equal(p1, p2), n1


def test_checkpoint_errors_name_the_file(megatron_single, tiny_ckpt, tmp_path):
    policy = MegatronPolicy(_cfg(tiny_ckpt))
    with pytest.raises(FileNotFoundError, match="model_tp0.pt"):
        policy.load_checkpoint(tmp_path)
    (tmp_path / "model_tp0.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="model_tp0.pt.*corrupted"):
        policy.load_checkpoint(tmp_path)
    off = MegatronPolicy(replace(_cfg(tiny_ckpt), mtp=MtpConfig(enabled=False)))
    off.save_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="MTP off"):
        policy.load_checkpoint(tmp_path)


@pytest.mark.parametrize("change, message", [
    (dict(mtp=MtpConfig(enabled=True, num_speculative_tokens=0)), "num_speculative_tokens must be >= 1"),
    (dict(mtp=MtpConfig(enabled=True, loss_type="kl")), "loss_type='kl' is unknown"),
    (dict(megatron=MegatronConfig(cp_size=2)), "context parallel"),
    (dict(megatron=MegatronConfig(pp_size=3)), "2 decoder layers do not split evenly over 3 pipeline stages"),
    (dict(megatron=MegatronConfig(pp_size=2), mtp=MtpConfig(enabled=True, detach_embedding=False)),
     "detach_embedding=false with megatron.pp_size=2"),
])
def test_bad_config_fails_before_building(tiny_ckpt, change, message):
    with pytest.raises(ValueError, match=message):
        MegatronPolicy(replace(_cfg(tiny_ckpt), **change), init_distributed=False)


def test_mtp_on_model_without_mtp_layers(tmp_path):
    from skyrl_mtp.models.checkpoint import random_hf_state_dict, save_hf_checkpoint
    from skyrl_mtp.models.mimo import get_preset

    cfg = get_preset("tiny").replace(num_mtp_layers=0)
    save_hf_checkpoint(cfg, random_hf_state_dict(cfg), tmp_path / "nomtp")
    with pytest.raises(ValueError, match="no MTP layers"):
        MegatronPolicy(_cfg(tmp_path / "nomtp"), init_distributed=False)
