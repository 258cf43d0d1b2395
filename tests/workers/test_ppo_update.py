"""PPO mini-batch updates of the Megatron policy against a float64 re-implementation.

The reference is transformers' Qwen2 (an independent implementation of the same network) in
float64 on the same checkpoint, with the DAPO objective written out here: old log-probs once
from the rollout's weights, then one plain-SGD step per mini-batch (clip-higher 0.2 / 0.28,
token-mean over the mini-batch), 4 mini-batches x 2 epochs. Plain SGD keeps the update linear in
the gradient, so float32 vs float64 differences stay at rounding level (Adam's normalisation
would amplify them on near-zero gradients).
"""

from __future__ import annotations

import pytest
import torch

from skyrl_mtp.config.schema import AlgorithmConfig, MegatronConfig, MtpConfig, OptimConfig, TisConfig
from skyrl_mtp.tools.check_policy_invariance import synthetic_batch
from skyrl_mtp.workers.config import PolicyWorkerConfig

LR = 0.1
MINI_BATCHES = [[0, 1], [2, 3], [4, 5], [6, 7]]
EPOCHS = [MINI_BATCHES, [MINI_BATCHES[2], MINI_BATCHES[0], MINI_BATCHES[3], MINI_BATCHES[1]]]


def _cfg(path, **algorithm) -> PolicyWorkerConfig:
    return PolicyWorkerConfig(model_path=str(path), megatron=MegatronConfig(micro_batch_size=1),
                              optim=OptimConfig(optimizer="sgd", lr=LR, clip_grad=1e9),
                              algorithm=AlgorithmConfig(clip_eps_low=0.2, clip_eps_high=0.28, loss_agg_mode="token_mean",
                                                        **algorithm),
                              mtp=MtpConfig(enabled=False), temperature=1.0)


def _batch(vocab: int) -> dict[str, torch.Tensor]:
    batch = synthetic_batch(0, min(vocab, 300), 8, 16, 5)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 1.5, -1.5, 1.0, -0.7])
    batch["advantages"] = adv[:, None] * batch["loss_mask"]
    return batch


def _reference_update(ckpt, batch, old) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(ckpt), torch_dtype=torch.float64)
    ids, mask, adv = batch["input_ids"], batch["loss_mask"].double(), batch["advantages"].double()
    targets = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], 1)

    def logprobs(rows):
        logits = model(input_ids=ids[rows]).logits
        return torch.log_softmax(logits, -1).gather(-1, targets[rows, :, None])[..., 0]

    old = old.double()
    for epoch in EPOCHS:
        for rows in epoch:
            model.zero_grad()
            ratio = torch.exp(logprobs(rows) - old[rows])
            a, m = adv[rows], mask[rows]
            losses = torch.maximum(-a * ratio, -a * ratio.clamp(0.8, 1.28))
            ((losses * m).sum() / m.sum()).backward()
            with torch.no_grad():
                for p in model.parameters():
                    if p.grad is not None:
                        p -= LR * p.grad
    return {k: v.detach() for k, v in model.state_dict().items()}


def _relative_update_error(before, after, reference) -> float:
    names = [k for k in reference if k in after and ".mtp_layers." not in k]
    num = sum(((after[k].double() - before[k].double()) - (reference[k] - before[k].double())).pow(2).sum()
              for k in names)
    den = sum((reference[k] - before[k].double()).pow(2).sum() for k in names)
    return float((num / den).sqrt())


def test_ppo_minibatches_match_float64_reference(tiny_ckpt, megatron_single):
    from skyrl_mtp.models.checkpoint import load_hf_state_dict
    from skyrl_mtp.workers.policy import MegatronPolicy

    policy = MegatronPolicy(_cfg(tiny_ckpt), init_distributed=False)
    batch = _batch(policy.model_cfg.vocab_size)
    before = load_hf_state_dict(tiny_ckpt)
    # Old log-probs once, before the first update; the rollout came from a policy a little off
    # the trainer's (as with a stale or bf16 engine), so ratios start away from 1 and the clip acts.
    # Both sides take these as data.
    drift = 0.3 * torch.randn(batch["loss_mask"].shape, generator=torch.Generator().manual_seed(3))
    batch["old_logprobs"] = policy.compute_logprobs(batch)["logprobs"] + drift * batch["loss_mask"]
    clip_fracs = []
    for epoch in EPOCHS:
        for rows in epoch:
            metrics = policy.train_step({k: v[rows] for k, v in batch.items()})
            clip_fracs.append(metrics["policy/clip_frac"])
    after = policy.export_hf_weights()
    reference = _reference_update(tiny_ckpt, batch, batch["old_logprobs"])
    error = _relative_update_error(before, after, reference)
    assert error <= 1e-5, error
    assert min(clip_fracs) > 0, clip_fracs  # clip-higher acted in every step


def test_single_step_without_old_logprobs_equals_separate_forward(tiny_ckpt, megatron_single):
    """One mini-batch and one epoch: the detached log-probs of the training forward stand in
    for a separate old-log-prob pass, with the same update."""
    from skyrl_mtp.workers.policy import MegatronPolicy

    separate = MegatronPolicy(_cfg(tiny_ckpt), init_distributed=False)
    fused = MegatronPolicy(_cfg(tiny_ckpt), init_distributed=False)
    batch = _batch(separate.model_cfg.vocab_size)
    with_old = dict(batch, old_logprobs=separate.compute_logprobs(batch)["logprobs"])
    m1 = separate.train_step(with_old)
    m2 = fused.train_step(batch)
    a, b = separate.policy_state(), fused.policy_state()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert m1["policy/loss"] == pytest.approx(m2["policy/loss"], rel=1e-6)


def test_tis_is_a_no_op_when_sides_agree_and_changes_the_update_otherwise(tiny_ckpt, megatron_single):
    from skyrl_mtp.workers.policy import MegatronPolicy

    tis = {"tis": TisConfig(enabled=True, mode="token", cap=2.0)}
    plain, agree, differ = (MegatronPolicy(_cfg(tiny_ckpt, **extra), init_distributed=False)
                            for extra in ({}, tis, tis))
    batch = _batch(plain.model_cfg.vocab_size)
    batch["old_logprobs"] = plain.compute_logprobs(batch)["logprobs"]
    plain.train_step(batch)
    same = agree.train_step(dict(batch, rollout_logprobs=batch["old_logprobs"].clone()))
    assert same["rollout/logprob_abs_diff"] == 0.0 and same["rollout/is_ratio"] == pytest.approx(1.0)
    shifted = batch["old_logprobs"] - 0.4 * batch["loss_mask"] * (torch.arange(8)[:, None] % 2)
    changed = differ.train_step(dict(batch, rollout_logprobs=shifted))
    p, a, d = plain.policy_state(), agree.policy_state(), differ.policy_state()
    assert all(torch.equal(p[k], a[k]) for k in p)
    assert max((p[k] - d[k]).abs().max().item() for k in p) > 1e-6
    # half the sequences disagree by 0.4 on every token: the mismatch metrics say so
    assert changed["rollout/logprob_abs_diff_max"] == pytest.approx(0.4, rel=1e-5)
    assert 0.1 < changed["rollout/logprob_abs_diff"] < 0.3
