"""Train-step cost of MTP head training: the same batches with MTP on vs off; prints JSON.

    python scripts/bench_train_step.py --hidden 2048 --layers 16 --heads 16 --kv-heads 8 --ffn 5632 \
        --vocab 151680 --seq 4096 --batch 4 --micro-batch 1 --dtype bfloat16     # ~1B MiMo-shaped, GPU
    python scripts/bench_train_step.py --hidden 128 --layers 2 --seq 256 --batch 8   # CPU smoke size

Each policy is built from the same random checkpoint, in its own child process (one process's
CUDA memory is not reliably returned after `del`, and a fresh allocator makes the two peaks
comparable); `--warmup` steps are discarded, then the median of `--steps` step times is
reported. overhead = t(MTP on) / t(MTP off) - 1. With ``--microbatch-share S`` (< 1) a third
variant trains the head on that share of the micro-batches (trainer.mtp.microbatch_share):
overhead_at_share. Keep --steps a multiple of the micro-batches' period (e.g. 0.25 with 4
micro-batches a step trains the head once a step).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import torch
from bench_common import run_variants, time_train_steps

from skyrl_mtp.mtp.replay import DEPTH_ATTENTION


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--ffn", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=151680)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--loss-type", default="soft_ce")
    p.add_argument("--topk", type=int, default=64)
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--depths", type=int, default=1)
    p.add_argument("--depth-attention", default="causal", choices=DEPTH_ATTENTION,
                   help="how depths >= 2 attend in the head's replay (trainer.mtp.depth_attention)")
    p.add_argument("--microbatch-share", type=float, default=1.0,
                   help="below 1: a third variant, the head trained on this share of the micro-batches")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--variant", choices=["mtp_off", "mtp_on", "mtp_share"], help=argparse.SUPPRESS)  # child process
    p.add_argument("--model-path", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return {}

    from skyrl_mtp.models.checkpoint import random_hf_state_dict

    model = bench_model(args)
    variants = ("mtp_off", "mtp_on") + (("mtp_share",) if args.microbatch_share < 1 else ())
    results = run_variants(__file__, variants, model, "bench_train_step")
    n_params = sum(v.numel() for v in random_hf_state_dict(model.replace(num_mtp_layers=0), 0).values()) \
        if args.hidden <= 512 else None
    report = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "shape": {"hidden": args.hidden, "layers": args.layers, "vocab": args.vocab, "seq": args.seq,
                  "batch": args.batch, "micro_batch": args.micro_batch, "dtype": args.dtype},
        "trunk_params": n_params,
        "loss_type": args.loss_type, "depths": args.depths, "depth_attention": args.depth_attention,
        **results,
        "overhead": results["mtp_on"]["median_s"] / results["mtp_off"]["median_s"] - 1.0,
    }
    if "mtp_share" in results:
        report["microbatch_share"] = args.microbatch_share
        report["overhead_at_share"] = results["mtp_share"]["median_s"] / results["mtp_off"]["median_s"] - 1.0
    print(json.dumps(report))
    return report


def bench_model(args):
    from skyrl_mtp.models.mimo import get_preset

    return get_preset("tiny").replace(name="bench", vocab_size=args.vocab, hidden_size=args.hidden,
                                      num_layers=args.layers, num_attention_heads=args.heads,
                                      num_query_groups=args.kv_heads, ffn_hidden_size=args.ffn,
                                      max_position_embeddings=max(args.seq, 512), tokenizer=None)


def run_variant(args) -> dict:
    """One policy (MTP off or on) from the checkpoint at --model-path: step times and peak memory."""
    from skyrl_mtp.tools.check_policy_invariance import synthetic_batch
    from skyrl_mtp.config.schema import MegatronConfig, MtpConfig, OptimConfig
    from skyrl_mtp.workers.config import PolicyWorkerConfig
    from skyrl_mtp.workers.policy import MegatronPolicy

    base = PolicyWorkerConfig(model_path=args.model_path, optim=OptimConfig(lr=1e-5), mtp=MtpConfig(enabled=False),
                              megatron=MegatronConfig(micro_batch_size=args.micro_batch, params_dtype=args.dtype,
                                                      mtp_loss_chunk_size=args.chunk_size))
    mtp = MtpConfig(enabled=True, num_speculative_tokens=args.depths, loss_type=args.loss_type, topk=args.topk,
                    microbatch_share=args.microbatch_share if args.variant == "mtp_share" else 1.0,
                    depth_attention=args.depth_attention)
    policy = MegatronPolicy(base if args.variant == "mtp_off" else replace(base, mtp=mtp))

    def batch_for_step(step: int) -> dict:
        batch = synthetic_batch(step, min(args.vocab, 30000), args.batch, args.seq, args.seq // 4)
        batch["old_logprobs"] = torch.zeros(args.batch, args.seq)
        return batch

    result = time_train_steps(policy, batch_for_step, args.warmup, args.steps)
    return result


if __name__ == "__main__":
    main()
