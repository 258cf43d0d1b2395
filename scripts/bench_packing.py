"""Train tokens/s with sequence packing vs padded micro-batches, on the same RL-shaped batch; prints JSON.

    python scripts/bench_packing.py --preset tiny --batch 32 --seq 512 --budget 2048      # CPU
    python scripts/bench_packing.py --preset mimo_7b_shapes --layers 12 --batch 64 --seq 4096 \
        --budget 16384 --micro-batch 2 --dtype bfloat16 --recompute full                      # GPU

The batch has long-tailed response lengths (lognormal, median --median-len, capped at --seq; the
shape that pads worst), a prompt of --prompt-len tokens and random token ids. Each variant builds
the same random checkpoint in its own child process (a fresh allocator, comparable peaks), runs
--warmup train steps then times --steps, and reports the median step time and "train tokens/s":
the tokens that can count (each sequence up to its last loss position + 1, what packing keeps)
per second. The padded variant runs micro-batches of --micro-batch rows, every row padded to the
batch's longest sequence (as the RL driver hands a batch over); the packed one puts whole
sequences into micro-batches of at most --budget tokens.
"""

from __future__ import annotations

import argparse
import json

import torch
from bench_common import run_variants, time_train_steps


def rl_batch(batch: int, seq: int, prompt_len: int, median_len: int, vocab: int, seed: int = 0) -> dict:
    """Prompt + long-tailed responses, right-padded to ``seq``: ids, loss mask, advantages, old log-probs."""
    gen = torch.Generator().manual_seed(seed)
    response = torch.exp(torch.randn(batch, generator=gen) * 0.8 + torch.log(torch.tensor(float(median_len))))
    lengths = (prompt_len + response.round().long()).clamp(prompt_len + 2, seq)
    seq = int(lengths.max())  # right-padded to the batch's longest sequence, as the RL driver does
    pos = torch.arange(seq)[None]
    return {"input_ids": torch.randint(4, vocab, (batch, seq), generator=gen),
            "loss_mask": ((pos + 1 >= prompt_len) & (pos + 1 < lengths[:, None])).float(),
            "advantages": torch.randn(batch, generator=gen)[:, None].expand(-1, seq).contiguous(),
            "old_logprobs": torch.zeros(batch, seq)}


def run_variant(args) -> dict:
    from skyrl_mtp.config.schema import MegatronConfig, MtpConfig, OptimConfig
    from skyrl_mtp.workers.config import PolicyWorkerConfig
    from skyrl_mtp.workers.packing import sequence_lengths
    from skyrl_mtp.workers.policy import MegatronPolicy

    packed = args.variant == "packed"
    megatron = MegatronConfig(micro_batch_size=args.micro_batch, params_dtype=args.dtype, recompute=args.recompute,
                              max_tokens_per_microbatch=args.budget if packed else None)
    policy = MegatronPolicy(PolicyWorkerConfig(model_path=args.model_path, optim=OptimConfig(lr=1e-5), megatron=megatron,
                                               mtp=MtpConfig(enabled=args.mtp, num_speculative_tokens=1)))
    batch = rl_batch(args.batch, args.seq, args.prompt_len, args.median_len, min(policy.model_cfg.vocab_size, 30000))
    counted = sum(sequence_lengths(batch["loss_mask"]))
    padded_tokens = batch["input_ids"].numel()
    out = {**time_train_steps(policy, lambda step: batch, args.warmup, args.steps), "counted_tokens": counted,
           "padded_tokens": padded_tokens}
    out["train_tokens_per_s"] = counted / out["median_s"]
    return out


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help="model preset of the random checkpoint")
    p.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=512, help="the longest possible sequence (lengths are capped there)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--median-len", type=int, default=96, help="median response length")
    p.add_argument("--micro-batch", type=int, default=4, help="rows per padded micro-batch")
    p.add_argument("--budget", type=int, default=2048, help="tokens per packed micro-batch")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--recompute", default="none", choices=["none", "selective", "full"],
                   help="megatron.recompute (the 7B recipe uses full)")
    p.add_argument("--mtp", action=argparse.BooleanOptionalAction, default=True, help="train the MTP head too")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--variant", choices=["padded", "packed"], help=argparse.SUPPRESS)  # child process
    p.add_argument("--model-path", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.budget < args.seq:
        p.error(f"--budget {args.budget} must hold the longest sequence (--seq {args.seq})")
    if args.variant:
        print(json.dumps(run_variant(args)))
        return {}

    from skyrl_mtp.models.families import get_preset

    model = get_preset(args.preset)
    if args.layers is not None:
        model = model.replace(num_layers=args.layers)
    results = run_variants(__file__, ("padded", "packed"), model, "bench_packing")
    report = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "preset": args.preset, "layers": model.num_layers, "batch": args.batch, "seq": args.seq,
              "micro_batch": args.micro_batch, "budget": args.budget, "dtype": args.dtype, "mtp": args.mtp,
              "recompute": args.recompute,
              **results,
              "speedup": results["packed"]["train_tokens_per_s"] / results["padded"]["train_tokens_per_s"]}
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
