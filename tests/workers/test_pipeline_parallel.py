"""Pipeline parallel 2 with the MTP head (two CPU processes, gloo) against the single-process run.

The tiny preset has 2 decoder layers: stage 0 holds the embedding and layer 0, stage 1 layer 1,
the final norm, the output layer and the MTP head (with its replica of the embedding). The
reference is the same policy at pp_size=1, driven like the RL driver drives it: old log-probs once
per rollout batch, then one optimizer step per PPO mini-batch.
"""

from __future__ import annotations

import os
import traceback

import pytest
import torch
import torch.multiprocessing as mp

from skyrl_mtp.config.schema import AlgorithmConfig, MegatronConfig, MtpConfig, OptimConfig
from skyrl_mtp.tools.check_policy_invariance import synthetic_batch
from skyrl_mtp.workers.config import PolicyWorkerConfig

pytestmark = pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 2,
                                reason="two ranks need two GPUs")
STEPS = 3
BATCH = 8
MINI_BATCHES = 2


def _cfg(path, pp=1, tp=1, budget=None) -> PolicyWorkerConfig:
    # micro_batch_size 3 on 4-row mini-batches: micro-batches of 3 and 1 rows (shapes sent ahead);
    # packed (budget): micro-batches of whole sequences, each of its own length
    return PolicyWorkerConfig(model_path=str(path), megatron=MegatronConfig(pp_size=pp, tp_size=tp, micro_batch_size=3,
                                                                            max_tokens_per_microbatch=budget),
                              optim=OptimConfig(lr=1e-3), temperature=0.9,
                              algorithm=AlgorithmConfig(clip_eps_low=0.2, clip_eps_high=0.28),
                              mtp=MtpConfig(enabled=True, num_speculative_tokens=2, loss_type="soft_ce",
                                            optim=OptimConfig(lr=3e-3)))


def _train(policy, steps=STEPS, first=0):
    """Per rollout batch: old log-probs, then MINI_BATCHES optimizer steps. Returns (log-probs of
    the first batch, metrics of every step); both None/{} entries on stages that hold none."""
    logprobs, metrics = None, []
    for step in range(first, first + steps):
        batch = synthetic_batch(step, 300, BATCH, 20, 6)
        out = policy.compute_logprobs(batch)
        if out is not None:
            logprobs = logprobs if logprobs is not None else out["logprobs"]
        # old log-probs must be identical on every stage: the last stage's, sent to all
        old = out["logprobs"] if out is not None else torch.zeros(BATCH, 20)
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.broadcast(old, src=torch.distributed.get_world_size() - 1)
        batch["old_logprobs"] = old
        per = BATCH // MINI_BATCHES
        for start in range(0, BATCH, per):
            metrics.append(policy.train_step({k: v[start:start + per] for k, v in batch.items()}))
    return logprobs, metrics


def _worker(rank, world, port, path, out_dir, ckpt_dir, budget=None):
    try:
        from skyrl_mtp.workers.policy import MegatronPolicy

        policy = MegatronPolicy(_cfg(path, pp=2, budget=budget), rank=rank, world_size=world, master_port=port)
        logprobs, metrics = _train(policy)
        hf = policy.export_hf_weights()
        hf = hf and {k: v.clone() for k, v in hf.items()}  # on CPU these are views of parameters trained below
        policy.save_checkpoint(ckpt_dir)
        # A fresh policy in the same process groups, resumed from the stage shards, then one more
        # rollout batch on both: the resumed one must match bitwise (weights, both optimizers,
        # the head's embedding replica).
        resumed = MegatronPolicy(_cfg(path, pp=2, budget=budget), rank=rank, world_size=world, master_port=port)
        resumed.load_checkpoint(ckpt_dir)
        _, more = _train(policy, steps=1, first=STEPS)
        _, more_resumed = _train(resumed, steps=1, first=STEPS)
        same = {k: torch.equal(a, b) for k, a in policy.policy_state().items()
                for b in [resumed.policy_state()[k]]}
        head_same = policy.head is None or all(
            torch.equal(a, b) for a, b in zip(policy.head.state_dict().values(), resumed.head.state_dict().values())
            if torch.is_tensor(a))
        torch.save({"logprobs": logprobs, "metrics": metrics, "hf": hf, "stage": policy.stage.pp_rank,
                    "resume_same": all(same.values()) and head_same, "more": more, "more_resumed": more_resumed,
                    "shard": policy.shard_name(), "has_head": policy.head is not None},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    except Exception:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


def _run_two(path, tmp_path, budget=None):
    from skyrl_mtp.megatron.parallel import free_port

    ctx = mp.get_context("spawn")
    port = free_port()
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    out.mkdir()
    ckpt.mkdir()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, str(path), str(out), str(ckpt), budget)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
    errors = [f.read_text() for f in out.glob("*.err")]
    assert not errors, errors[0]
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)], ckpt


@pytest.mark.slow
def test_pipeline_parallel_2_with_mtp_matches_1(megatron_single, tiny_ckpt, tmp_path):
    from skyrl_mtp.workers.policy import MegatronPolicy

    single = MegatronPolicy(_cfg(tiny_ckpt))
    ref_logprobs, ref_metrics = _train(single)
    ref_hf = single.export_hf_weights()
    ranks, ckpt = _run_two(tiny_ckpt, tmp_path)
    first, last = ranks

    assert (first["stage"], last["stage"]) == (0, 1)
    assert not first["has_head"] and last["has_head"]  # the head lives on the last stage only
    assert first["logprobs"] is None  # log-probs come from the last stage
    torch.testing.assert_close(last["logprobs"], ref_logprobs, rtol=0, atol=1e-5)

    # The export gathers both stages (global layer numbers) and the head on the first stage's rank.
    assert last["hf"] is None and set(first["hf"]) == set(ref_hf)
    worst = max((first["hf"][k] - ref_hf[k]).abs().max().item() for k in ref_hf)
    assert worst <= 1e-5, worst
    mtp_keys = [k for k in ref_hf if "mtp_layers" in k]
    assert mtp_keys and max((first["hf"][k] - ref_hf[k]).abs().max().item() for k in mtp_keys) <= 1e-5

    assert len(last["metrics"]) == len(ref_metrics) == STEPS * MINI_BATCHES
    for got, want in zip(last["metrics"], ref_metrics):
        for key in ("policy/loss", "policy/entropy", "mtp/loss", "mtp/loss_depth_2", "policy/grad_norm",
                    "mtp/grad_norm"):
            assert abs(got[key] - want[key]) <= 1e-5 * max(1.0, abs(want[key])), (key, got[key], want[key])
    # Only the last stage computes the loss; every stage reports the policy's (global) grad norm.
    assert "policy/loss" not in first["metrics"][0] and "mtp/loss" not in first["metrics"][0]
    assert first["metrics"][-1]["policy/grad_norm"] == last["metrics"][-1]["policy/grad_norm"]
    assert ref_metrics[-1]["mtp/loss"] < ref_metrics[0]["mtp/loss"]  # the head learns

    # Checkpoint: one shard per stage, and a resumed policy continues bitwise.
    assert sorted(p.name for p in ckpt.iterdir()) == ["model_tp0_pp0.pt", "model_tp0_pp1.pt"]
    assert first["resume_same"] and last["resume_same"]
    assert last["more"][-1]["mtp/loss"] == last["more_resumed"][-1]["mtp/loss"]


@pytest.mark.slow
def test_pipeline_parallel_2_packed_matches_1_padded(megatron_single, tiny_ckpt, tmp_path):
    """Packed micro-batches (<= 36 tokens: 2 or 3 sequences, a different length each) through the
    two-stage 1F1B schedule, which sends each activation's shape ahead (variable_seq_lengths),
    against the padded single-stage run: log-probs on the loss positions, losses, grad norms and
    weights within 1e-5; a resume from the stage shards continues bitwise."""
    from skyrl_mtp.workers.policy import MegatronPolicy

    single = MegatronPolicy(_cfg(tiny_ckpt))
    ref_logprobs, ref_metrics = _train(single)
    ref_hf = single.export_hf_weights()
    (first, last), _ = _run_two(tiny_ckpt, tmp_path, budget=36)
    mask = synthetic_batch(0, 300, BATCH, 20, 6)["loss_mask"].bool()
    assert (last["logprobs"][mask] - ref_logprobs[mask]).abs().max().item() <= 1e-5
    worst = max((first["hf"][k] - ref_hf[k]).abs().max().item() for k in ref_hf)
    assert worst <= 1e-5, worst
    for got, want in zip(last["metrics"], ref_metrics):
        for key in ("policy/loss", "mtp/loss", "mtp/loss_depth_2", "policy/grad_norm", "mtp/grad_norm"):
            assert abs(got[key] - want[key]) <= 1e-5 * max(1.0, abs(want[key])), (key, got[key], want[key])
    assert first["resume_same"] and last["resume_same"]


@pytest.mark.slow
@pytest.mark.parametrize("attach_output_layer", [False, True])
def test_invariance_tool_at_pipeline_parallel_2(tiny_ckpt, attach_output_layer):
    from skyrl_mtp.tools.check_policy_invariance import main as invariance

    argv = ["--steps", "2", "--mini-batches", "2", "--pp", "2", "--model", str(tiny_ckpt)]
    report = invariance(argv + (["--attach-output-layer"] if attach_output_layer else []))
    assert report["pp"] == 2 and len(report["per_rank"]) == 2
    if attach_output_layer:  # negative control: the leak reaches the last stage's output layer
        assert report["identical"] is False and report["max_abs_diff"] > 0
    else:
        assert report["identical"] is True and report["max_abs_diff"] == 0.0
        assert all(r["identical"] for r in report["per_rank"])
