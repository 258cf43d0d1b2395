"""Check that MTP head training leaves the policy's update untouched, bitwise.

    python -m skyrl_mtp.tools.check_policy_invariance --steps 5 [--mini-batches 4] [--loss-type soft_ce] [--model DIR] [--tp 2] [--pp 2]
        [--distributed-optimizer] [--recompute full] [--max-tokens-per-microbatch 64]

Trains two copies of the same policy on identical batches, K batches of M PPO mini-batches (one
optimizer step each, old log-probs computed once per batch), one with the decoupled MTP draft
loss and one without, then compares every policy parameter. Prints JSON:
``{"identical": bool, "max_abs_diff": float, "mtp_loss_first": float, "mtp_loss_last": float, ...}``.
Runs on one process (CPU or one GPU), or with ``--tp N`` / ``--pp M`` on N x M processes
(tensor-parallel groups of N, pipelines of M stages; gloo on CPU, NCCL with one GPU per rank),
where every rank compares its own shard (its stage's layers, and on the last stage the output
layer the head shares) and the report covers all of them. Without --model it makes a random
tiny checkpoint.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from skyrl_mtp.mtp.losses import LOSS_TYPES
from skyrl_mtp.mtp.replay import DEPTH_ATTENTION
from skyrl_mtp.config.schema import AlgorithmConfig, MegatronConfig, MtpConfig, OptimConfig
from skyrl_mtp.workers.config import PolicyWorkerConfig


def synthetic_batch(step: int, vocab: int, batch: int, seq: int, prompt_len: int) -> dict[str, torch.Tensor]:
    """A deterministic RL-shaped batch: prompt + response ids, response loss mask, advantages."""
    gen = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(4, vocab, (batch, seq), generator=gen)
    lengths = torch.randint(seq // 2, seq + 1, (batch,), generator=gen)
    pos = torch.arange(seq)[None]
    # position t predicts token t+1: loss where t+1 is a response token (prompt_len <= t+1 < length)
    loss_mask = ((pos + 1 >= prompt_len) & (pos + 1 < lengths[:, None])).float()
    adv = torch.randn(batch, generator=gen)[:, None].expand(-1, seq).contiguous()
    return {"input_ids": ids, "loss_mask": loss_mask, "advantages": adv}


def run(args, rank: int = 0, world_size: int = 1, master_port: int | None = None) -> dict:
    import os

    from skyrl_mtp.workers.policy import MegatronPolicy

    if torch.cuda.is_available():
        # Bitwise comparison needs deterministic kernels (e.g. embedding backward uses atomics).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)

    model = args.model or random_tiny_checkpoint(args.seed, args.preset)
    base = PolicyWorkerConfig(
        model_path=model, temperature=1.0,
        megatron=MegatronConfig(tp_size=args.tp, pp_size=args.pp, micro_batch_size=args.micro_batch_size,
                                params_dtype=args.dtype,
                                mtp_loss_chunk_size=args.chunk_size,
                                use_distributed_optimizer=args.distributed_optimizer, recompute=args.recompute,
                                max_tokens_per_microbatch=args.max_tokens_per_microbatch),
        algorithm=AlgorithmConfig(clip_eps_low=0.2, clip_eps_high=0.28),
        optim=OptimConfig(lr=args.lr, clip_grad=1.0), mtp=MtpConfig(enabled=False))
    mtp_cfg = MtpConfig(enabled=True, num_speculative_tokens=args.num_depths, loss_type=args.loss_type,
                        topk=args.topk, optim=OptimConfig(lr=args.head_lr, clip_grad=1.0),
                        depth_attention=args.depth_attention,
                        # a negative control: an attached output layer lets the draft loss train the policy
                        detach_shared_output=not args.attach_output_layer)
    dist = dict(rank=rank, world_size=world_size, master_port=master_port)
    with_mtp = MegatronPolicy(replace(base, mtp=mtp_cfg), **dist)
    without = MegatronPolicy(base, **dist)  # joins the process groups the first one set up
    vocab = with_mtp.model_cfg.vocab_size
    mtp_losses = []
    for step in range(args.steps):
        batch = synthetic_batch(step, min(vocab, 300), args.batch_size, args.seq_len, args.prompt_len)
        # Old log-probs from the MTP-off copy (the on-policy value both copies would use), once
        # per rollout batch; then one optimizer step per mini-batch, as the RL driver does.
        # per rollout batch, as the RL driver does. With pipeline stages only the last computes
        # them, and only the last needs them.
        old = without.compute_logprobs(batch)
        if old is not None:
            batch["old_logprobs"] = old["logprobs"]
        per = args.batch_size // args.mini_batches
        for start in range(0, args.batch_size, per):
            mini = {k: v[start:start + per] for k, v in batch.items()}
            on = with_mtp.train_step(mini)
            without.train_step(mini)
            mtp_losses.append(on.get("mtp/loss"))  # the last pipeline stage's
    a, b = with_mtp.policy_state(), without.policy_state()
    diffs = [(a[k].double() - b[k].double()).abs().max().item() for k in a]
    identical = all(torch.equal(a[k], b[k]) for k in a) and set(a) == set(b)
    return {"identical": identical, "max_abs_diff": max(diffs), "mtp_loss_first": mtp_losses[0],
            "mtp_loss_last": mtp_losses[-1], "steps": args.steps, "mini_batches": args.mini_batches,
            "optimizer_steps": args.steps * args.mini_batches, "loss_type": args.loss_type,
            "num_policy_tensors": len(a), "tp": args.tp, "pp": args.pp, "pp_rank": with_mtp.pp_rank,
            "max_tokens_per_microbatch": args.max_tokens_per_microbatch,
            **runtime_facts()}


def random_tiny_checkpoint(seed: int, preset: str = "tiny") -> str:
    from skyrl_mtp.tools.init_model import main as init_model

    model = tempfile.mkdtemp(prefix="skyrl_mtp_invariance_") + f"/{preset}"
    init_model(["--preset", preset, "--out", model, "--seed", str(seed)])
    return model


def _rank_main(rank: int, args, port: int, out_dir: str) -> None:
    import os
    import traceback

    try:
        report = run(args, rank=rank, world_size=args.tp * args.pp, master_port=port)
    except BaseException:
        Path(out_dir, f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))
    os._exit(0)  # skip process-group teardown; the parent reads the files


def run_parallel(args) -> dict:
    """``run`` on ``args.tp * args.pp`` spawned ranks; identical only if every rank's shard is."""
    import torch.multiprocessing as mp

    from skyrl_mtp.megatron.parallel import free_port

    world = args.tp * args.pp
    if torch.cuda.is_available() and torch.cuda.device_count() < world:
        raise SystemExit(f"--tp {args.tp} --pp {args.pp} needs {world} GPUs (NCCL, one per rank); this machine has "
                         f"{torch.cuda.device_count()}. Run on CPU (gloo) by hiding the GPUs: CUDA_VISIBLE_DEVICES=")
    args.model = args.model or random_tiny_checkpoint(args.seed, args.preset)  # one checkpoint for all ranks
    out_dir = tempfile.mkdtemp(prefix="skyrl_mtp_invariance_mp_")
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, args, port, out_dir)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    errors = sorted(Path(out_dir).glob("rank*.err"))
    if errors or any(p.exitcode != 0 for p in procs):
        detail = errors[0].read_text()[-3000:] if errors else f"exit codes {[p.exitcode for p in procs]}"
        raise RuntimeError(f"check_policy_invariance --tp {args.tp} --pp {args.pp}: a rank failed:\n{detail}")
    ranks = [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(world)]
    last = next(r for r in ranks if r["pp_rank"] == args.pp - 1)  # where the draft loss is computed
    return {**last, "identical": all(r["identical"] for r in ranks),
            "max_abs_diff": max(r["max_abs_diff"] for r in ranks),
            "per_rank": [{k: r[k] for k in ("identical", "max_abs_diff", "num_policy_tensors", "pp_rank")}
                         for r in ranks]}


def runtime_facts() -> dict:
    """Where the check ran: device, megatron-core version, and which output_processor path was live."""
    import megatron.core

    from skyrl_mtp.megatron.compat import has_native_output_processor

    return {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "megatron_core": megatron.core.__version__,
            "output_processor": "native" if has_native_output_processor() else "skyrl_mtp subclass"}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--loss-type", default="soft_ce", choices=list(LOSS_TYPES))
    parser.add_argument("--topk", type=int, default=16)
    parser.add_argument("--num-depths", type=int, default=1)
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument("--depth-attention", default="causal", choices=DEPTH_ATTENTION,
                        help="how depths >= 2 attend in the head's replay (trainer.mtp.depth_attention)")
    parser.add_argument("--model", default=None, help="HF checkpoint, mimo or qwen3_5 (default: a random one of --preset)")
    parser.add_argument("--preset", default="tiny", help="preset of the random checkpoint without --model (tiny, qwen3_5_tiny)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--mini-batches", type=int, default=4, help="optimizer steps per batch (PPO mini-batches)")
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--head-lr", type=float, default=3e-3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size (one process per rank)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline stages (one process per rank)")
    parser.add_argument("--distributed-optimizer", action="store_true",
                        help="Megatron's distributed optimizer for policy and head (megatron.use_distributed_optimizer)")
    parser.add_argument("--recompute", default="none", choices=["none", "selective", "full"],
                        help="activation recompute (megatron.recompute)")
    parser.add_argument("--max-tokens-per-microbatch", type=int, default=None,
                        help="sequence packing: micro-batches of whole sequences up to this many tokens "
                             "(megatron.max_tokens_per_microbatch; replaces --micro-batch-size)")
    parser.add_argument("--attach-output-layer", action="store_true",
                        help="let the draft loss train the shared output layer (must then report identical=false)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if args.tp < 1 or args.pp < 1:
        parser.error(f"--tp and --pp must be >= 1, got --tp {args.tp} --pp {args.pp}")
    if args.mini_batches < 1 or args.batch_size % args.mini_batches:
        parser.error(f"--mini-batches={args.mini_batches} must be >= 1 and divide --batch-size={args.batch_size}")
    report = run(args) if args.tp * args.pp == 1 else run_parallel(args)
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
