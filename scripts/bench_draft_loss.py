"""Benchmark skyrl_mtp.mtp.losses.draft_loss against a naive full-softmax fp32 implementation.

For each loss type it measures forward + backward wall time and peak extra memory of
``draft_loss`` (chunked, no TP) and of a plain-autograd reference (``log_softmax`` etc. on the
whole ``[B, S, V]`` in fp32), and prints one JSON object.

The defaults are the GPU target (V=151936, S=8192, bf16 logits, CUDA). On a CPU pass smaller
sizes, e.g.::

    PYTHONPATH=. .venv/bin/python scripts/bench_draft_loss.py --device cpu --dtype float32 \\
        --vocab 32768 --seq 512 --batch 1 --chunk-size 64 --repeats 5

Memory ("peak_extra_mib") is the peak of bytes allocated above what was allocated before the
fwd+bwd started (the logits, mask and labels are already there; the student gradient is
counted). On CUDA it is ``torch.cuda.max_memory_allocated`` minus the baseline. On CPU it is the
running sum of the CPU allocator's allocation/free events recorded by ``torch.profiler``
(``profile_memory=True``) during one separate, untimed fwd+bwd; it counts tensor storage only,
not allocator caching or RSS. On CUDA each result also reports its time over the
memory-bandwidth bound: read the student and teacher logits once and write the gradient once,
at ``--bandwidth-gbps`` (default 3350 GB/s, H100 SXM HBM3).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from skyrl_mtp.mtp.losses import LOSS_TYPES, draft_loss

MIB = 2**20


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--topk", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="bfloat16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--bandwidth-gbps", type=float, default=3350.0)
    parser.add_argument("--loss-types", nargs="+", choices=LOSS_TYPES, default=list(LOSS_TYPES))
    return parser.parse_args()


def naive_loss(
    student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
    loss_type: str, topk: int, temperature: float,
) -> torch.Tensor:
    """The same losses as draft_loss, by plain autograd on full [B, S, V] fp32 tensors."""
    z = student.float() / temperature
    y = teacher.detach().float() / temperature
    log_q = torch.log_softmax(z, dim=-1)
    if loss_type == "soft_ce":
        per_position = -(torch.softmax(y, dim=-1) * log_q).sum(-1)
    elif loss_type == "topk_soft_ce":
        top_logits, top_ids = y.topk(topk, dim=-1)
        per_position = -(torch.softmax(top_logits, dim=-1) * log_q.gather(-1, top_ids)).sum(-1)
    elif loss_type == "hard_ce":
        per_position = F.nll_loss(log_q.flatten(0, 1), labels.flatten(), reduction="none").view(mask.shape)
    else:
        per_position = 0.5 * (torch.softmax(y, dim=-1) - log_q.exp()).abs().sum(-1)
    return (per_position * mask).sum() / mask.sum()


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(step: Callable[[], None], device: str, repeats: int) -> tuple[float, float]:
    """(median, min) wall time of `step` over `repeats` runs, after one warm-up run."""
    step()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), min(times)


def peak_extra_bytes(step: Callable[[], None], device: str) -> int:
    """Peak bytes allocated above the level at entry while `step` runs (see module docstring)."""
    if device == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        step()
        synchronize(device)
        return torch.cuda.max_memory_allocated() - baseline
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return peak


def bandwidth_bound_ms(student: torch.Tensor, gbps: float) -> float:
    """Read student + teacher logits once, write the student gradient once."""
    bytes_moved = 3 * student.numel() * student.element_size()
    return bytes_moved / (gbps * 1e9) * 1e3


def measure(
    loss_fn: Callable[[torch.Tensor], torch.Tensor], student: torch.Tensor, args: argparse.Namespace
) -> dict:
    def step() -> None:
        student.grad = None
        loss_fn(student).backward()

    with torch.no_grad():
        loss_value = loss_fn(student).item()
    median_ms, min_ms = time_ms(step, args.device, args.repeats)
    student.grad = None  # so the measured step allocates its gradient from scratch
    result = {
        "time_ms": round(median_ms, 3),
        "time_min_ms": round(min_ms, 3),
        "peak_extra_mib": round(peak_extra_bytes(step, args.device) / MIB, 2),
        "loss": loss_value,
    }
    if args.device == "cuda":
        result["time_over_bandwidth_bound"] = round(result["time_ms"] / bandwidth_bound_ms(student, args.bandwidth_gbps), 2)
    student.grad = None
    return result


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device, dtype = args.device, getattr(torch, args.dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (args.batch, args.seq, args.vocab)
    student = (3.0 * torch.randn(shape, generator=gen, device=device)).to(dtype).requires_grad_(True)
    teacher = (3.0 * torch.randn(shape, generator=gen, device=device)).to(dtype)
    mask = (torch.rand(shape[:2], generator=gen, device=device) > 0.1).float()
    labels = torch.randint(0, args.vocab, shape[:2], generator=gen, device=device)

    results = {}
    for loss_type in args.loss_types:
        ours = measure(
            lambda s: draft_loss(
                s, teacher, mask, loss_type=loss_type, labels=labels, topk=args.topk,
                temperature=args.temperature, chunk_size=args.chunk_size,
            ),
            student, args,
        )
        naive = measure(
            lambda s: naive_loss(s, teacher, mask, labels, loss_type, args.topk, args.temperature), student, args
        )
        results[loss_type] = {
            "draft_loss": ours,
            "naive_fp32": naive,
            "speedup_vs_naive": round(naive["time_ms"] / ours["time_ms"], 2),
            "memory_ratio_naive_over_ours": round(naive["peak_extra_mib"] / ours["peak_extra_mib"], 2),
            "loss_rel_diff": abs(ours["loss"] - naive["loss"]) / abs(naive["loss"]),
        }

    report = {
        "config": {
            "vocab": args.vocab, "seq": args.seq, "batch": args.batch, "chunk_size": args.chunk_size,
            "topk": args.topk, "temperature": args.temperature, "dtype": args.dtype, "repeats": args.repeats,
            "tp": 1,
        },
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "time_method": (
            f"time_ms: median (time_min_ms: min) wall-clock of forward+backward over {args.repeats} "
            "runs after 1 warm-up"
        ),
        "memory_method": (
            "torch.cuda.max_memory_allocated minus allocated before the step (student grad included)"
            if device == "cuda"
            else "peak of the running sum of CPU allocator alloc/free events (torch.profiler, "
            "profile_memory=True) in one untimed forward+backward; tensor storage only, student grad "
            "included, inputs excluded"
        ),
        "bandwidth_gbps": args.bandwidth_gbps if device == "cuda" else None,
        "bandwidth_bound_ms": round(bandwidth_bound_ms(student, args.bandwidth_gbps), 3) if device == "cuda" else None,
        "results": results,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
