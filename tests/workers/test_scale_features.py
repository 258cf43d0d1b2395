"""Memory features of the policy change nothing numerically: Megatron's distributed optimizer
(ZeRO-1 over DP, for the trunk and separately for the MTP head) against the plain optimizer,
activation recompute against none, optimizer CPU offload against none (GPU only), and the config
checks that refuse what cannot run. Sequence packing against padding: tests/workers/test_packing.py."""

from __future__ import annotations

import os
import traceback

import pytest
import torch
import torch.multiprocessing as mp

from skyrl_mtp.config.schema import AlgorithmConfig, ConfigError, MegatronConfig, MtpConfig, OptimConfig
from skyrl_mtp.tools.check_policy_invariance import synthetic_batch
from skyrl_mtp.workers.config import PolicyWorkerConfig

STEPS = 3
BATCH = 8


def _cfg(path, depth_attention: str = "causal", **megatron) -> PolicyWorkerConfig:
    return PolicyWorkerConfig(model_path=str(path), megatron=MegatronConfig(micro_batch_size=2, **megatron),
                              optim=OptimConfig(lr=1e-3), algorithm=AlgorithmConfig(),
                              mtp=MtpConfig(enabled=True, num_speculative_tokens=2, optim=OptimConfig(lr=3e-3),
                                            depth_attention=depth_attention))


def _batch(step: int, rows: int = BATCH) -> dict[str, torch.Tensor]:
    b = synthetic_batch(step, 300, rows, 20, 6)
    b["old_logprobs"] = -5.0 + 0.1 * torch.randn(rows, 20, generator=torch.Generator().manual_seed(step))
    return b


def _grads(module) -> dict[str, torch.Tensor]:
    return {n: p.main_grad.detach().clone() for n, p in module.named_parameters()}


def _adam_numel(opt) -> int:
    """Elements of exp_avg held by this rank's optimizer (all chained parts)."""
    total = 0
    for part in getattr(opt, "chained_optimizers", [opt]):
        for state in part.optimizer.state.values():
            total += state["exp_avg"].numel() if "exp_avg" in state else 0
    return total


# ---------------------------------------------------------------- recompute
@pytest.mark.parametrize("mode,depth_attention", [("selective", "causal"), ("full", "causal"),
                                                   ("full", "drafter_cache")])
def test_recompute_gives_identical_gradients(megatron_single, tiny_ckpt, mode, depth_attention):
    """Megatron's recompute re-runs the same CPU kernels on the same inputs: the trunk's and the
    head's gradients are bitwise those without recompute (and the head's are not zero: Megatron's
    full recompute of an MTP layer on detached inputs would silently give it none). With the
    drafter-cache attention the recomputed core attention reads the same draft chain (it rides in
    the checkpointed closure)."""
    from skyrl_mtp.workers.policy import MegatronPolicy

    grads = {}
    for name in ("none", mode):
        policy = MegatronPolicy(_cfg(tiny_ckpt, depth_attention, recompute=name), init_distributed=False)
        assert policy.trunk.config.recompute_granularity == (None if name == "none" else mode)
        policy.accumulate_gradients(_batch(0))
        grads[name] = (_grads(policy.trunk), _grads(policy.head))
    for ref, got in zip(grads["none"], grads[mode]):
        assert set(ref) == set(got)
        for n in ref:
            assert torch.equal(ref[n], got[n]), (n, (ref[n] - got[n]).abs().max().item())
    head_ref = grads["none"][1]
    assert sum(g.abs().sum().item() for g in head_ref.values()) > 0


def test_drafter_cache_attention_changes_the_head_gradients_only(megatron_single, tiny_ckpt):
    """trainer.mtp.depth_attention reaches the training path: with two depths the head's gradients
    differ between the two replays, the trunk's are bitwise the same."""
    from skyrl_mtp.workers.policy import MegatronPolicy

    grads = {}
    for mode in ("causal", "drafter_cache"):
        policy = MegatronPolicy(_cfg(tiny_ckpt, mode), init_distributed=False)
        policy.accumulate_gradients(_batch(0))
        grads[mode] = (_grads(policy.trunk), _grads(policy.head))
    trunk, head = zip(grads["causal"], grads["drafter_cache"])
    assert all(torch.equal(trunk[0][n], trunk[1][n]) for n in trunk[0])
    assert max((head[0][n] - head[1][n]).abs().max().item() for n in head[0]) > 1e-6


# ---------------------------------------------------------------- distributed optimizer
def _dp2_worker(rank, port, path, ckpt_dir, out_dir):
    try:
        from skyrl_mtp.workers.policy import MegatronPolicy

        cfg = _cfg(path, use_distributed_optimizer=True)
        policy = MegatronPolicy(cfg, rank=rank, world_size=2, master_port=port)
        per = BATCH // 2
        shard = lambda b: {k: v[rank * per:(rank + 1) * per] for k, v in b.items()}
        metrics = [policy.train_step(shard(_batch(s))) for s in range(STEPS - 1)]
        policy.save_checkpoint(ckpt_dir)  # collective: the shards are gathered on DP rank 0
        metrics.append(policy.train_step(shard(_batch(STEPS - 1))))
        out = {"metrics": metrics, "hf": policy.export_hf_weights(),
               "adam_numel": {"trunk": _adam_numel(policy.trunk_opt), "head": _adam_numel(policy.head_opt)},
               "numel": {"trunk": sum(p.numel() for p in policy.trunk.parameters()),
                         "head": sum(p.numel() for p in policy.head.parameters())}}
        # A fresh policy resumed from the checkpoint takes the last step again.
        resumed = MegatronPolicy(cfg, rank=rank, world_size=2, init_distributed=False)
        resumed.load_checkpoint(ckpt_dir)
        resumed.train_step(shard(_batch(STEPS - 1)))
        out["hf_resumed"] = resumed.export_hf_weights()
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    except Exception:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 2, reason="two ranks need two GPUs")
def test_distributed_optimizer_at_dp2_matches_plain_optimizer(megatron_single, tiny_ckpt, tmp_path):
    """DP=2 with Megatron's DistributedOptimizer (gloo on CPU: reduce-scatter and all-gather
    into tensors are gloo collectives in torch 2.13) against one rank with the plain optimizer:
    same weights after 3 Adam steps within 1e-5 (the tolerance the plain DP=2 test uses; the
    grads are summed in another order), same grad norms of policy and head (each clipped on its
    own), each rank holding about half of each optimizer's Adam state; a checkpoint taken at DP=2
    resumes to the same weights."""
    from skyrl_mtp.megatron.parallel import free_port
    from skyrl_mtp.workers.policy import MegatronPolicy

    plain = MegatronPolicy(_cfg(tiny_ckpt), init_distributed=False)
    plain_metrics = [plain.train_step(_batch(s)) for s in range(STEPS)]
    plain_hf = plain.export_hf_weights()

    ckpt_dir = tmp_path / "ckpt"
    ckpt_dir.mkdir()
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_dp2_worker, args=(r, port, str(tiny_ckpt), str(ckpt_dir), str(tmp_path)))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
    errors = [f.read_text() for f in tmp_path.glob("*.err")]
    assert not errors, errors[0]
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]

    hf = ranks[0]["hf"]
    assert set(hf) == set(plain_hf)
    worst = max((hf[k] - plain_hf[k]).abs().max().item() for k in hf)
    assert worst <= 1e-5, worst
    assert any(k.startswith("model.mtp_layers.") for k in hf)
    for step in range(STEPS):
        for key in ("policy/grad_norm", "mtp/grad_norm", "policy/loss", "mtp/loss"):
            ref, got = plain_metrics[step][key], ranks[0]["metrics"][step][key]
            assert abs(got - ref) <= 1e-5 * max(1.0, abs(ref)), (step, key, got, ref)
    for r in ranks:  # ZeRO-1: each rank's Adam state covers about half of each module
        for module in ("trunk", "head"):
            share = r["adam_numel"][module] / r["numel"][module]
            assert 0.4 <= share <= 0.6, (module, share)
    resumed = ranks[0]["hf_resumed"]
    diffs = {k: (resumed[k] - hf[k]).abs().max().item() for k in hf}
    assert max(diffs.values()) == 0.0, sorted(diffs.items(), key=lambda kv: -kv[1])[:5]


# ---------------------------------------------------------------- optimizer CPU offload
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Megatron's HybridDeviceOptimizer offloads GPU tensors")
@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_optimizer_cpu_offload_matches_no_offload(megatron_single, tiny_ckpt, fraction):
    """bf16 policy, distributed optimizer, one rank: Adam on the host (torch's fused CPU AdamW) for
    `fraction` of the parameters, fp32 master weights held by the hybrid optimizer, against Adam
    on the GPU with Megatron's fp32 main params. Two steps, the second checking that the Adam
    state carried over. Both start from the same weights and batch, so they update fp32 masters
    from the same fp32 grads; the kernels differ, so every weight agrees to bf16 rounding (one ulp,
    2**-7 relative) after each step. Not further: once a bf16 weight differs by an ulp, the grads
    differ, and where a gradient is rounding noise Adam's step (~lr whatever the gradient's size)
    takes a random sign. On an H200 the third step put 3.4% of all elements beyond rounding: 10-16%
    of the MTP head's matrices (at init the student matches its teacher to rounding, so its grads
    are noise) and 14-26 of 64 key-bias elements (the softmax cancels a key bias: its exact gradient
    is zero, which is why the key biases get only the lr bound here). An offload that updated
    wrongly or not at all would move nearly every element off; the updates are real (weights moved
    by more than that)."""
    from skyrl_mtp.workers.policy import MegatronPolicy

    steps, lr = 2, 3e-3  # lr: the head's, the larger of the two learning rates
    after, start = {}, None
    for offload in (False, True):
        policy = MegatronPolicy(_cfg(tiny_ckpt, params_dtype="bfloat16", use_distributed_optimizer=True,
                                     optimizer_cpu_offload=offload, optimizer_offload_fraction=fraction),
                                init_distributed=False)
        start = start or policy.export_hf_weights(dtype=torch.float32)
        for step in range(steps):
            policy.train_step(_batch(step))
            after[offload, step] = policy.export_hf_weights(dtype=torch.float32)
    moved = max((after[False, steps - 1][k] - start[k]).abs().max().item() for k in start)
    assert moved > 1e-3, moved
    for step in range(steps):
        for k, ref in after[False, step].items():
            diff = (after[True, step][k] - ref).abs()
            assert diff.max().item() <= 2 * lr * (step + 1), (step, k, diff.max().item())
            if k.endswith("k_proj.bias"):
                continue
            beyond_rounding = int((diff > 2 ** -7 * ref.abs() + 1e-6).sum())
            assert beyond_rounding == 0, (step, k, beyond_rounding, ref.numel())


# ---------------------------------------------------------------- config checks
def _validated(**megatron):
    from skyrl_mtp.config.schema import Config, validate_config

    cfg = Config()
    for key, value in megatron.items():
        setattr(cfg.megatron, key, value)
    return validate_config(cfg)


def test_config_refuses_what_megatron_cannot_run():
    with pytest.raises(ConfigError, match=r"megatron\.recompute='some'"):
        _validated(recompute="some")
    with pytest.raises(ConfigError, match=r"megatron\.optimizer_cpu_offload=True: offload moves GPU-resident"):
        _validated(optimizer_cpu_offload=True, use_distributed_optimizer=True)
    with pytest.raises(ConfigError, match=r"set megatron\.use_distributed_optimizer=true"):
        _validated(optimizer_cpu_offload=True, num_gpus_per_worker=1.0)
    with pytest.raises(ConfigError, match=r"megatron\.optimizer_offload_fraction=1\.5: the share"):
        _validated(optimizer_cpu_offload=True, use_distributed_optimizer=True, num_gpus_per_worker=1.0,
                   optimizer_offload_fraction=1.5)
    from skyrl_mtp.config.schema import Config, validate_config

    cfg = Config()
    cfg.megatron.use_distributed_optimizer = True
    cfg.trainer.optim.optimizer = "sgd"
    with pytest.raises(ConfigError, match=r"trainer\.optim\.optimizer='sgd': Megatron's distributed optimizer"):
        validate_config(cfg)
    _validated(use_distributed_optimizer=True, recompute="full")  # valid on CPU


def test_worker_refuses_offload_without_cuda(tiny_ckpt):
    if torch.cuda.is_available():
        pytest.skip("the refusal is for CPU-only workers")
    with pytest.raises(ValueError, match="optimizer_cpu_offload=true needs a GPU"):
        _cfg(tiny_ckpt, use_distributed_optimizer=True, optimizer_cpu_offload=True).validate(1)


# ---------------------------------------------------------------- decoupling with the features on
@pytest.mark.parametrize("features", [dict(use_distributed_optimizer=True), dict(recompute="full"),
                                      dict(recompute="selective"),
                                      dict(max_tokens_per_microbatch=48, recompute="selective")])
def test_policy_update_is_bitwise_the_same_without_mtp(megatron_single, tiny_ckpt, features):
    """With each feature on, the policy after 2 steps is bitwise the policy trained without the MTP
    head (the head has its own optimizer, shards and clipping; recompute never lets it reach the trunk;
    packed micro-batches, here with the core attention recomputed, keep the replay detached)."""
    from dataclasses import replace

    from skyrl_mtp.workers.policy import MegatronPolicy

    weights = {}
    for mtp in (True, False):
        cfg = _cfg(tiny_ckpt, **features)
        cfg = replace(cfg, mtp=replace(cfg.mtp, enabled=mtp))
        policy = MegatronPolicy(cfg, init_distributed=False)
        for s in range(2):
            policy.train_step(_batch(s))
        weights[mtp] = policy.policy_state()
    assert set(weights[True]) == set(weights[False])
    assert all(torch.equal(weights[True][k], weights[False][k]) for k in weights[True])


def test_head_microbatch_share_trains_the_head_on_the_chosen_micro_batches_only(megatron_single, tiny_ckpt):
    """trainer.mtp.microbatch_share=0.5 over 4 micro-batches of 2 rows: the head trains on
    micro-batches 2 and 4 (evenly spaced). Reference: share 1.0 on a batch of only those rows. The
    head after one step and the per-depth draft losses agree; the policy is bitwise the share-1.0
    policy's on the whole batch (the head never reaches it)."""
    from dataclasses import replace

    from skyrl_mtp.workers.policy import MegatronPolicy, head_microbatches

    assert head_microbatches(0, 4, 0.5) == [False, True, False, True]
    batch = _batch(0)
    chosen = [2, 3, 6, 7]  # the rows of micro-batches 2 and 4 (micro_batch_size 2)
    only_chosen = {k: v[chosen] for k, v in batch.items()}

    def trained(share: float, rows: dict):
        cfg = _cfg(tiny_ckpt)
        policy = MegatronPolicy(replace(cfg, mtp=replace(cfg.mtp, microbatch_share=share)), init_distributed=False)
        metrics = policy.train_step(rows)
        state = policy.export_hf_weights(dtype=torch.float32)
        return metrics, {k: v for k, v in state.items() if "mtp" in k}, policy.policy_state()

    half, half_head, half_policy = trained(0.5, batch)
    ref, ref_head, _ = trained(1.0, only_chosen)
    _, full_head, full_policy = trained(1.0, batch)
    for depth in (1, 2):
        assert half[f"mtp/loss_depth_{depth}"] == pytest.approx(ref[f"mtp/loss_depth_{depth}"], rel=1e-5)
    for k in ref_head:
        torch.testing.assert_close(half_head[k], ref_head[k], rtol=1e-5, atol=1e-6)
    # the share matters: on all four micro-batches the head ends elsewhere
    assert max((full_head[k] - ref_head[k]).abs().max().item() for k in ref_head) > 1e-4
    assert all(torch.equal(half_policy[k], full_policy[k]) for k in full_policy)
    # share 0.25 over 2 micro-batches a step: none in the first step, so the head is not stepped
    # at all (Adam on a zero gradient would still move it); the second step trains it
    cfg = _cfg(tiny_ckpt)
    policy = MegatronPolicy(replace(cfg, mtp=replace(cfg.mtp, microbatch_share=0.25)), init_distributed=False)
    start = {k: v for k, v in policy.export_hf_weights(dtype=torch.float32).items() if "mtp" in k}
    first = policy.train_step({k: v[:4] for k, v in batch.items()})
    after_first = {k: v for k, v in policy.export_hf_weights(dtype=torch.float32).items() if "mtp" in k}
    assert "mtp/grad_norm" not in first and all(torch.equal(after_first[k], start[k]) for k in start)
    policy.train_step({k: v[4:] for k, v in batch.items()})
    after_second = {k: v for k, v in policy.export_hf_weights(dtype=torch.float32).items() if "mtp" in k}
    assert max((after_second[k] - start[k]).abs().max().item() for k in start) > 1e-4


def test_invariance_tool_with_distributed_optimizer_and_full_recompute(tiny_ckpt):
    """check_policy_invariance with the features on: bitwise identical over PPO mini-batches, and
    its negative control (the draft loss attached to the shared output layer) is still caught."""
    from skyrl_mtp.tools.check_policy_invariance import main as invariance

    argv = ["--steps", "2", "--mini-batches", "2", "--model", str(tiny_ckpt), "--distributed-optimizer",
            "--recompute", "full"]
    report = invariance(argv)
    assert report["identical"] is True and report["max_abs_diff"] == 0.0
    leak = invariance(argv + ["--attach-output-layer"])
    assert leak["identical"] is False and leak["max_abs_diff"] > 0


def test_drafter_cache_attention_is_refused_for_a_head_of_several_layers(tiny_ckpt):
    """vLLM's proposer runs the first MTP layer at every draft step, so the drafter-cache replay of a
    deeper head would train an attention no engine runs: refused when the worker starts."""
    _cfg(tiny_ckpt, "drafter_cache").validate(1)
    with pytest.raises(ValueError, match=r"depth_attention=drafter_cache models vLLM drafting with one MTP layer; "
                                         r"the model has 2"):
        _cfg(tiny_ckpt, "drafter_cache").validate(2)
    _cfg(tiny_ckpt, "causal").validate(2)


def test_invariance_tool_with_the_drafter_cache_attention(tiny_ckpt):
    """Three draft depths replayed as vLLM's drafter runs them: the policy is still bitwise the one
    trained without MTP, and the negative control is caught."""
    from skyrl_mtp.tools.check_policy_invariance import main as invariance

    argv = ["--steps", "2", "--mini-batches", "2", "--model", str(tiny_ckpt), "--num-depths", "3",
            "--depth-attention", "drafter_cache", "--loss-type", "tv"]
    report = invariance(argv)
    assert report["identical"] is True and report["max_abs_diff"] == 0.0
    leak = invariance(argv + ["--attach-output-layer"])
    assert leak["identical"] is False and leak["max_abs_diff"] > 0


def test_recompute_is_refused_for_the_qwen3_5_family():
    """Its layers are built from its own TransformerConfig, which does not take the recompute fields:
    refused rather than silently ignored."""
    from skyrl_mtp.config.schema import Config, validate_config

    cfg = Config()
    cfg.model.preset = "qwen3_5_tiny"
    cfg.generator.dtype = "bfloat16"
    cfg.generator.enable_prefix_caching = False
    cfg.megatron.recompute = "full"
    with pytest.raises(ConfigError, match=r"megatron\.recompute='full': the qwen3_5 family"):
        validate_config(cfg)
