"""Data parallel 2 and tensor parallel 2 (two CPU processes, gloo), and data parallel 2 x pipeline
parallel 2 (four), against the single-process run, padded or with packed micro-batches
(megatron.max_tokens_per_microbatch)."""

from __future__ import annotations

import os
import traceback

import pytest
import torch
import torch.multiprocessing as mp

from skyrl_mtp.tools.check_policy_invariance import synthetic_batch
from skyrl_mtp.config.schema import AlgorithmConfig, MegatronConfig, MtpConfig, OptimConfig
from skyrl_mtp.workers.config import PolicyWorkerConfig

# On GPU each rank needs its own device (NCCL); on CPU both ranks share the cores (gloo).
pytestmark = pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 2,
                                reason="two ranks need two GPUs")
STEPS = 3
BATCH = 8


def _cfg(path, tp=1, one_valid=False, budget=None, pp=1) -> PolicyWorkerConfig:
    agg = "seq_mean_token_mean" if one_valid else "token_mean"
    # adam_eps 1e-4, not 1e-8: Adam's first step is lr * sign(g), so a gradient element that is ~0
    # up to summation order (different across DP / TP / packing) moves by a full lr either way. At
    # 1e-8 that put the MTP head 2e-3 apart on an AVX-512 CPU; at 1e-4 the runs agree to 1.2e-7.
    return PolicyWorkerConfig(model_path=str(path), megatron=MegatronConfig(tp_size=tp, pp_size=pp, micro_batch_size=2,
                                                                            max_tokens_per_microbatch=budget),
                              optim=OptimConfig(lr=1e-3, adam_eps=1e-4),
                              algorithm=AlgorithmConfig(clip_eps_low=0.2, clip_eps_high=0.28, loss_agg_mode=agg),
                              mtp=MtpConfig(enabled=True, num_speculative_tokens=2,
                                            optim=OptimConfig(lr=3e-3, adam_eps=1e-4)))


def _batches(one_valid=False):
    """STEPS batches of BATCH rows; with `one_valid`, 2 rows of which only the first has response
    tokens (the second is what the worker group pads a batch with): one valid sequence, two ranks."""
    out = []
    rows = 2 if one_valid else BATCH
    for step in range(STEPS):
        b = synthetic_batch(step, 300, rows, 20, 6)
        b["old_logprobs"] = -5.0 + 0.1 * torch.randn(rows, 20, generator=torch.Generator().manual_seed(step))
        if one_valid:
            b["loss_mask"][1:] = 0
            b["advantages"][1:] = 0
        out.append(b)
    return out


def _train(policy, batches, shard=lambda b: b):
    # (pipeline stages other than the last compute no log-probs: None there)
    logprobs = [(out or {}).get("logprobs") for out in [policy.compute_logprobs(shard(b)) for b in batches[:1]]]
    metrics = [policy.train_step(shard(b)) for b in batches]
    return logprobs, metrics


def _worker(rank, world, port, path, tp, out_dir, one_valid=False, budget=None, pp=1):
    try:
        from skyrl_mtp.workers.policy import MegatronPolicy

        policy = MegatronPolicy(_cfg(path, tp, one_valid, budget, pp), rank=rank, world_size=world, master_port=port)
        dp, dp_rank = policy.dp_size, policy.dp_rank
        batches = _batches(one_valid)
        per = batches[0]["input_ids"].shape[0] // dp
        shard = lambda b: {k: v[dp_rank * per:(dp_rank + 1) * per] for k, v in b.items()}
        logprobs, metrics = _train(policy, batches, shard)
        hf = policy.export_hf_weights()
        torch.save({"logprobs": logprobs, "metrics": metrics, "hf": hf, "dp_rank": dp_rank,
                    "last_stage": policy.stage.last}, os.path.join(out_dir, f"rank{rank}.pt"))
    except Exception:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


def _run_two(path, tp, tmp_path, one_valid=False, budget=None, pp=1):
    from skyrl_mtp.megatron.parallel import free_port

    ctx = mp.get_context("spawn")
    port = free_port()
    world = 2 * pp
    procs = [ctx.Process(target=_worker, args=(r, world, port, str(path), tp, str(tmp_path), one_valid, budget, pp))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    errors = [f.read_text() for f in tmp_path.glob("*.err")]
    assert not errors, errors[0]
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def single(megatron_single, tiny_ckpt):
    from skyrl_mtp.workers.policy import MegatronPolicy

    policy = MegatronPolicy(_cfg(tiny_ckpt))
    logprobs, metrics = _train(policy, _batches())
    return {"logprobs": logprobs, "metrics": metrics, "hf": policy.export_hf_weights()}


def _assert_close_weights(a, b, tol):
    assert set(a) == set(b)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= tol, worst


@pytest.mark.slow
def test_data_parallel_2_matches_1(single, tiny_ckpt, tmp_path):
    ranks = _run_two(tiny_ckpt, 1, tmp_path)
    _assert_close_weights(ranks[0]["hf"], single["hf"], 1e-5)
    assert ranks[1]["hf"] is None  # only DP rank 0 exports
    for key in ("policy/loss", "mtp/loss", "policy/grad_norm", "mtp/grad_norm"):
        assert abs(ranks[0]["metrics"][-1][key] - single["metrics"][-1][key]) <= 1e-5 * max(1, abs(single["metrics"][-1][key]))


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 4, reason="four ranks need four GPUs")
def test_data_parallel_2_by_pipeline_parallel_2_matches_1(single, tiny_ckpt, tmp_path):
    """Four processes: two pipelines of two stages, each pipeline training its half of every batch.
    The gradients are reduced over DP within each stage; the head and its optimizer live on the last
    stage of both pipelines."""
    ranks = _run_two(tiny_ckpt, 1, tmp_path, pp=2)
    exports = [r["hf"] for r in ranks if r["hf"] is not None]
    assert len(exports) == 1  # DP rank 0's first stage holds the gathered export
    _assert_close_weights(exports[0], single["hf"], 1e-5)
    per = BATCH // 2
    last = [r for r in ranks if r["last_stage"]]
    assert sorted(r["dp_rank"] for r in last) == [0, 1]
    for r in last:  # each pipeline's log-probs are its shard's rows of the single-process ones
        rows = slice(r["dp_rank"] * per, (r["dp_rank"] + 1) * per)
        torch.testing.assert_close(r["logprobs"][0], single["logprobs"][0][rows], rtol=0, atol=1e-5)
        for key in ("policy/loss", "mtp/loss", "policy/grad_norm", "mtp/grad_norm"):
            ref = single["metrics"][-1][key]
            assert abs(r["metrics"][-1][key] - ref) <= 1e-5 * max(1, abs(ref)), key


@pytest.mark.slow
def test_data_parallel_2_with_one_valid_sequence_matches_1(megatron_single, tiny_ckpt, tmp_path):
    """seq_mean_token_mean with fewer valid sequences than DP ranks: each rank divides by
    (global sequences / dp_size) = 0.5, unclamped, so the update is the DP=1 update."""
    from skyrl_mtp.workers.policy import MegatronPolicy

    policy = MegatronPolicy(_cfg(tiny_ckpt, one_valid=True))
    _, metrics = _train(policy, _batches(one_valid=True))
    ranks = _run_two(tiny_ckpt, 1, tmp_path, one_valid=True)
    _assert_close_weights(ranks[0]["hf"], policy.export_hf_weights(), 1e-5)
    assert abs(ranks[0]["metrics"][-1]["policy/loss"] - metrics[-1]["policy/loss"]) <= 1e-5


@pytest.mark.slow
def test_tensor_parallel_2_matches_1(single, tiny_ckpt, tmp_path):
    ranks = _run_two(tiny_ckpt, 2, tmp_path)
    torch.testing.assert_close(ranks[0]["logprobs"][0], single["logprobs"][0], rtol=0, atol=1e-5)
    torch.testing.assert_close(ranks[1]["logprobs"][0], single["logprobs"][0], rtol=0, atol=1e-5)
    _assert_close_weights(ranks[0]["hf"], single["hf"], 1e-5)
    assert abs(ranks[0]["metrics"][-1]["mtp/loss"] - single["metrics"][-1]["mtp/loss"]) <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2])
def test_packed_at_two_ranks_matches_padded_single_rank(single, tiny_ckpt, tmp_path, tp):
    """Packed micro-batches of <= 40 tokens at DP=2 (each rank packs its own shard, so the ranks run
    different numbers of micro-batches) or TP=2 (both ranks pack the same rows) against the padded
    single-process run: log-probs on the loss positions, losses and weights after 3 steps within the
    tolerances of the padded two-rank tests above."""
    ranks = _run_two(tiny_ckpt, tp, tmp_path, budget=40)
    mask = _batches()[0]["loss_mask"].bool()
    _assert_close_weights(ranks[0]["hf"], single["hf"], 1e-5)
    if tp == 1:
        mask = mask[:BATCH // 2]  # DP rank 0's shard
    for r in ranks[: 2 if tp == 2 else 1]:
        diff = (r["logprobs"][0][mask] - single["logprobs"][0][: mask.shape[0]][mask]).abs().max().item()
        assert diff <= 1e-5, diff
    for key in ("policy/loss", "mtp/loss", "policy/grad_norm", "mtp/grad_norm"):
        ref = single["metrics"][-1][key]
        assert abs(ranks[0]["metrics"][-1][key] - ref) <= 1e-5 * max(1, abs(ref)), key


@pytest.mark.slow
@pytest.mark.parametrize("attach_output_layer", [False, True])
def test_invariance_tool_at_tensor_parallel_2(tiny_ckpt, attach_output_layer):
    from skyrl_mtp.tools.check_policy_invariance import main as invariance

    argv = ["--steps", "2", "--tp", "2", "--model", str(tiny_ckpt)]
    report = invariance(argv + (["--attach-output-layer"] if attach_output_layer else []))
    assert report["tp"] == 2 and len(report["per_rank"]) == 2
    if attach_output_layer:  # negative control: a leak must be caught on the sharded weights too
        assert report["identical"] is False and report["max_abs_diff"] > 0
    else:
        assert report["identical"] is True and report["max_abs_diff"] == 0.0
        assert all(r["identical"] and r["num_policy_tensors"] == report["num_policy_tensors"] for r in report["per_rank"])
