"""Ray actors: a data-parallel PolicyWorker group and a RefWorker group equal the in-process policy."""

from __future__ import annotations

import pytest
import torch

ray = pytest.importorskip("ray")

from skyrl_mtp.tools.check_policy_invariance import synthetic_batch  # noqa: E402
from skyrl_mtp.workers.actors import WorkerGroup, ray_init_local  # noqa: E402
from skyrl_mtp.config.schema import MegatronConfig, MtpConfig, OptimConfig
from skyrl_mtp.workers.config import PolicyWorkerConfig


@pytest.fixture(scope="module")
def ray_local():
    ray_init_local(num_cpus=2)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_policy_and_ref_groups(ray_local, tiny_ckpt):
    cfg = PolicyWorkerConfig(model_path=str(tiny_ckpt), megatron=MegatronConfig(micro_batch_size=4), optim=OptimConfig(lr=1e-3),
                             mtp=MtpConfig(enabled=True, optim=OptimConfig(lr=1e-3)))
    policy = WorkerGroup(cfg, dp_size=2, num_cpus_per_worker=0.5, num_threads=1)
    ref = WorkerGroup(cfg, dp_size=1, trainable=False, num_cpus_per_worker=0.5, num_threads=1, name="ref")
    batch = synthetic_batch(0, 300, 8, 16, 4)
    lp_policy = policy.compute_logprobs(batch)["logprobs"]
    lp_ref = ref.compute_logprobs(batch)["logprobs"]
    assert lp_policy.shape == (8, 16)
    torch.testing.assert_close(lp_policy, lp_ref, rtol=0, atol=1e-6)  # same weights, different layouts
    batch["old_logprobs"] = lp_policy
    metrics = policy.train_step(batch)
    assert {"policy/loss", "policy/grad_norm", "mtp/loss", "mtp/grad_norm", "mtp/loss_depth_1"} <= set(metrics)
    after = policy.compute_logprobs(batch)["logprobs"]
    assert not torch.equal(after, lp_policy)  # the policy moved
    torch.testing.assert_close(ref.compute_logprobs(batch)["logprobs"], lp_ref)  # the reference did not
    hf = policy.export_hf_weights()
    assert "model.mtp_layers.0.input_proj.weight" in hf and "lm_head.weight" in hf
    # Rows that do not divide over dp_size=2 (3 rows; 1 row, fewer than ranks) are padded with
    # rows that count nowhere: log-probs equal those of the even batch, and training still steps.
    for rows in (3, 1):
        even = policy.compute_logprobs(batch)["logprobs"]
        odd = {k: v[:rows] for k, v in batch.items()}
        odd["old_logprobs"] = policy.compute_logprobs(odd)["logprobs"]
        assert odd["old_logprobs"].shape == (rows, 16)
        torch.testing.assert_close(odd["old_logprobs"], even[:rows], rtol=0, atol=1e-6)
        assert policy.train_step(odd)["policy/update_ok"] == 1.0
    policy.shutdown()
    ref.shutdown()
