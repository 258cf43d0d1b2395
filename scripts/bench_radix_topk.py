"""Time the fused draft loss's radix-select top-k against torch.topk on bf16 teacher rows.

One JSON line per setting: rows x vocabulary of N(0, 3^2) logits in bf16, k; torch.topk's and the
radix kernel's time (``triton.testing.do_bench``, ms) for each search / tile / warps setting, and whether the
kernel chose the same columns as torch.topk (the values always agree; columns can differ only
among values tied with the k-th largest)::

    python3 scripts/bench_radix_topk.py --rows 2048 4096 --blocks 1024 2048 4096 --warps 4 8 --searches histogram bisect
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--blocks", type=int, nargs="+", default=[2048])
    parser.add_argument("--warps", type=int, nargs="+", default=[4])
    parser.add_argument("--searches", nargs="+", choices=("histogram", "bisect"), default=["histogram", "bisect"])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_radix_topk needs CUDA (the kernel's CPU interpreter is not a timing)")
    import triton
    from triton.testing import do_bench

    from skyrl_mtp.mtp import fused_loss

    gen = torch.Generator(device="cuda").manual_seed(0)
    for rows in args.rows:
        teacher = (3.0 * torch.randn(rows, args.vocab, generator=gen, device="cuda")).bfloat16()
        want_values, want_ids = teacher.topk(args.k, dim=-1, sorted=False)
        torch_ms = do_bench(lambda: teacher.topk(args.k, dim=-1, sorted=False))
        for search, block, warps in itertools.product(args.searches, args.blocks, args.warps):
            fused_loss._TOPK_BLOCK, fused_loss._TOPK_WARPS = block, warps
            fused_loss._TOPK_BISECT = search == "bisect"
            values, ids = fused_loss._local_topk(teacher, args.k)
            radix_ms = do_bench(lambda: fused_loss._local_topk(teacher, args.k))
            print(json.dumps({
                "rows": rows, "vocab": args.vocab, "k": args.k, "search": search, "block": block, "warps": warps,
                "torch_topk_ms": round(torch_ms, 4), "radix_topk_ms": round(radix_ms, 4),
                "speedup": round(torch_ms / radix_ms, 2),
                "same_values": torch.equal(values.sort(-1).values, want_values.float().sort(-1).values),
                "same_ids": torch.equal(ids.sort(-1).values, want_ids.sort(-1).values),
                "device": torch.cuda.get_device_name(), "triton": triton.__version__,
            }), flush=True)


if __name__ == "__main__":
    main()
