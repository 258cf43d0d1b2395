"""Benchmark skyrl_mtp.mtp.topk.row_topk against torch.topk on teacher-logit-shaped rows.

Prints one JSON object: per logit distribution, the median time of torch.topk and of row_topk
for each (max segment width, warps per segment program) setting, side by side in one run, with
whether the ids are the same set as torch.topk's (values equal and ids equal where values are
unique), the elements >= tau per row (mean / max; what the per-row buffer must hold) and the
rows that overflowed it. Memory-bandwidth bound: reading the rows twice at --bandwidth-gbps.

    python3 scripts/bench_topk.py                       # CUDA, 4,096 x 151,936 bf16, k = 64

Distributions: ``normal`` (iid N(0, 3^2)), ``clustered`` (normal, plus 6 on a block of 4,096
contiguous ids: the top mass sits in a few segments), ``projected`` (hidden [n, 256] @ W^T with
W [V, 256], both N(0, 1) / 16: correlated rows like a real output layer's).
"""

from __future__ import annotations

import argparse
import json

import torch

from skyrl_mtp.mtp import topk as topk_module


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--max-segs", type=int, nargs="+", default=[topk_module._MAX_SEG])
    parser.add_argument("--warps", type=int, nargs="+", default=[topk_module._WARPS])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--bandwidth-gbps", type=float, default=4300.0)
    return parser.parse_args()


def logits(kind: str, rows: int, vocab: int, dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator(device="cuda").manual_seed(0)
    if kind == "projected":
        hidden = torch.randn(rows, 256, device="cuda", generator=generator) / 16
        weight = torch.randn(vocab, 256, device="cuda", generator=generator) / 16
        return (hidden @ weight.t() * 64).to(dtype)
    values = torch.randn(rows, vocab, device="cuda", generator=generator) * 3
    if kind == "clustered":
        values[:, 50_000:54_096] += 6
    return values.to(dtype)


def median_ms(step, repeats: int) -> float:
    step()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def same_as_torch(ours: tuple[torch.Tensor, torch.Tensor], theirs: tuple[torch.Tensor, torch.Tensor]) -> bool:
    """Sorted values equal, and the id sets equal (torch may pick another id among ties at the
    k-th value; those rows are compared on values only)."""
    our_values, our_ids = ours
    their_values, their_ids = theirs
    if not torch.equal(our_values.sort(-1).values, their_values.float().sort(-1).values):
        return False
    kth = their_values.float().amin(-1, keepdim=True)
    tie_free = ((their_values.float() == kth).sum(-1) == 1)
    return torch.equal(our_ids[tie_free].sort(-1).values, their_ids[tie_free].sort(-1).values)


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_topk.py needs CUDA (row_topk's kernels; on CPU it is torch's key top-k)")
    dtype = getattr(torch, args.dtype)
    bytes_read = 2 * args.rows * args.vocab * torch.empty((), dtype=dtype).element_size()
    result = {
        "config": vars(args), "device_name": torch.cuda.get_device_name(), "torch": torch.__version__,
        "memory_bound_ms": round(bytes_read / (args.bandwidth_gbps * 1e9) * 1e3, 3),
        "time_method": f"median CUDA-event time of {args.repeats} calls after 1 warm-up",
        "results": {},
    }
    for kind in ("normal", "clustered", "projected"):
        values = logits(kind, args.rows, args.vocab, dtype)
        theirs = values.topk(args.k, dim=-1, sorted=False)
        entry = {"torch_topk_ms": round(median_ms(lambda: values.topk(args.k, dim=-1, sorted=False), args.repeats), 3)}
        for max_seg in args.max_segs:
            for warps in args.warps:
                topk_module._MAX_SEG, topk_module._WARPS = max_seg, warps
                plan = topk_module._segment_plan(args.vocab, args.k)
                counts = topk_module._candidates(values, args.k, *plan)[2]
                ours = topk_module.row_topk(values, args.k)
                entry[f"seg{max_seg}_warps{warps}"] = {
                    "ms": round(median_ms(lambda: topk_module.row_topk(values, args.k), args.repeats), 3),
                    "segment": plan[0], "same_as_torch": same_as_torch(ours, theirs),
                    "above_tau_mean": round(counts.float().mean().item(), 1), "above_tau_max": int(counts.max()),
                    "capacity": topk_module._capacity(args.k),
                    "overflow_rows": int((counts > topk_module._capacity(args.k)).sum()),
                }
        result["results"][kind] = entry
        print(json.dumps({kind: entry}), flush=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
