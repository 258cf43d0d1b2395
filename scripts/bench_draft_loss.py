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
at ``--bandwidth-gbps``.

With ``--hidden H`` (projection mode) the inputs are what the draft head really has: hidden
states ``[S, H]``, the frozen output weight ``[V, H]`` and the teacher (policy) logits ``[S, V]``,
all in ``--dtype``; the gradient is w.r.t. the hidden states, and the vocabulary projection is
part of every variant. Variants, per loss type, in one run:

- ``chunked_eager``: today's path: ``hidden @ W^T`` by autograd, then ``draft_loss`` (chunked);
- ``naive_fp32``: ``hidden @ W^T`` by autograd, then the plain-autograd fp32 loss;
- ``fused``: ``skyrl_mtp.mtp.fused_loss`` with the teacher logits;
- ``fused_teacher_hidden``: the same, teacher logits recomputed per chunk from teacher hidden
  states (one more projection, no ``[S, V]`` teacher in memory);
- ``liger`` (if liger-kernel is importable): ``LigerFusedLinearCrossEntropyLoss`` for hard_ce,
  ``LigerFusedLinearJSD(jsd_beta=0)`` (forward KL(p || q) = soft_ce - H(p): same gradient) from
  teacher hidden states for soft_ce; Liger has no top-k soft CE and no fused-linear TV.

Each result gets ``bound_ms``: the larger of the compute bound (the projections' FLOPs at
``--peak-tflops``: 2 projections of ``2*S*V*H`` with teacher logits, 3 when the teacher is
recomputed) and the memory bound (read teacher logits, weight, hidden once, write the gradient
once at ``--bandwidth-gbps``), with which one binds. ``--fp64-check`` also computes a float64
reference (chunked over rows) and reports each variant's relative error of loss and gradient.
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
    parser.add_argument("--bandwidth-gbps", type=float, default=4300.0,
                        help="memory bound's bandwidth (default: H200 device-to-device copy measured here)")
    parser.add_argument("--peak-tflops", type=float, default=788.0,
                        help="compute bound's dense bf16 rate (default: H200 8192^3 matmul measured here)")
    parser.add_argument("--hidden", type=int, default=0,
                        help="projection mode: hidden size H (0: the loss on given logits, as before)")
    parser.add_argument("--fused-chunk-rows", type=int, nargs="+", default=[None],
                        help="projection mode: the fused path's rows per chunk (default: its own); several values "
                             "are measured side by side as fused_rows<N>")
    parser.add_argument("--fp64-check", action="store_true", help="projection mode: errors vs a float64 reference")
    parser.add_argument("--variants", nargs="+", default=None, help="projection mode: subset of variants")
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
    if args.hidden > 0:
        print(json.dumps(projection_mode(args), indent=2))
        return
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


# --------------------------------------------------------------------------------------------
# Projection mode (--hidden H): the vocabulary projection is part of every variant
# --------------------------------------------------------------------------------------------


def _liger_loss(loss_type: str, temperature: float):
    """(a Liger fused-linear loss for `loss_type` or None, why not)."""
    if loss_type not in ("hard_ce", "soft_ce"):
        return None, "Liger has no fused-linear top-k soft CE or TV"
    if loss_type == "hard_ce" and temperature != 1.0:
        return None, "Liger's fused-linear CE has no temperature"
    try:
        if loss_type == "hard_ce":
            from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
            return LigerFusedLinearCrossEntropyLoss(ignore_index=-100, reduction="mean"), ""
        from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD
        return LigerFusedLinearJSD(jsd_beta=0.0, ignore_index=-100, temperature=temperature), ""
    except Exception as error:  # noqa: BLE001 - reported in the JSON, the other variants still run
        return None, f"liger-kernel not usable: {type(error).__name__}: {error}"


def _reference_fp64(hidden, weight, teacher, mask, labels, loss_type, topk, temperature, rows=512):
    """(loss, grad w.r.t. hidden) in float64, chunked over rows (the mean's normaliser is global)."""
    w64 = weight.double()
    norm = mask.double().sum()
    loss = torch.zeros((), dtype=torch.float64, device=hidden.device)
    grad = torch.empty(hidden.shape, dtype=torch.float64, device=hidden.device)
    for start in range(0, hidden.shape[0], rows):
        sl = slice(start, start + rows)
        h = hidden[sl].double().requires_grad_(True)
        z = (h @ w64.t()) / temperature
        log_q = torch.log_softmax(z, dim=-1)
        y = teacher[sl].double() / temperature
        if loss_type == "soft_ce":
            rows_loss = -(torch.softmax(y, dim=-1) * log_q).sum(-1)
        elif loss_type == "topk_soft_ce":
            top, ids = y.topk(topk, dim=-1)
            rows_loss = -(torch.softmax(top, dim=-1) * log_q.gather(-1, ids)).sum(-1)
        elif loss_type == "hard_ce":
            rows_loss = -log_q.gather(-1, labels[sl].clamp(min=0)[:, None]).squeeze(-1)
        else:
            rows_loss = 0.5 * (torch.softmax(y, dim=-1) - log_q.exp()).abs().sum(-1)
        part = (rows_loss * mask[sl].double()).sum() / norm
        (g,) = torch.autograd.grad(part, h)
        loss += part.detach()
        grad[sl] = g
    return loss, grad


def projection_mode(args: argparse.Namespace) -> dict:
    from skyrl_mtp.mtp.fused_loss import default_chunk_rows, fused_linear_draft_loss

    device, dtype = args.device, getattr(torch, args.dtype)
    rows, vocab, hidden_size = args.batch * args.seq, args.vocab, args.hidden
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(rows, hidden_size, generator=gen, device=device).to(dtype).requires_grad_(True)
    # Scaled so the logits have std ~3, like a trained LM head's.
    weight = (torch.randn(vocab, hidden_size, generator=gen, device=device) * (3.0 / hidden_size**0.5)).to(dtype)
    teacher_hidden = torch.randn(rows, hidden_size, generator=gen, device=device).to(dtype)
    with torch.no_grad():
        teacher = teacher_hidden @ weight.t()
    mask = (torch.rand(rows, generator=gen, device=device) > 0.1).float()
    labels = torch.randint(0, vocab, (rows,), generator=gen, device=device)
    labels_ignored = torch.where(mask > 0, labels, -100)
    eb = torch.tensor([], dtype=dtype).element_size()

    def bound(loss_type: str, teacher_from_hidden: bool) -> dict:
        projections = 3 if teacher_from_hidden else 2
        flops = projections * 2 * rows * vocab * hidden_size
        moved = (vocab * hidden_size + 3 * rows * hidden_size) * eb
        if loss_type != "hard_ce" and not teacher_from_hidden:
            moved += rows * vocab * eb
        compute_ms = flops / (args.peak_tflops * 1e12) * 1e3
        memory_ms = moved / (args.bandwidth_gbps * 1e9) * 1e3
        return {"bound_ms": max(compute_ms, memory_ms), "compute_bound_ms": round(compute_ms, 3),
                "memory_bound_ms": round(memory_ms, 3), "binds": "compute" if compute_ms >= memory_ms else "memory"}

    def variants(loss_type: str) -> dict:
        common = dict(loss_type=loss_type, labels=labels, topk=args.topk, temperature=args.temperature)
        out = {
            "chunked_eager": (lambda h: draft_loss((h @ weight.t())[None], teacher[None], mask[None],
                                                   chunk_size=args.chunk_size, **{**common, "labels": labels[None]}),
                              False),
            "naive_fp32": (lambda h: naive_loss((h @ weight.t())[None], teacher[None], mask[None], labels[None],
                                                loss_type, args.topk, args.temperature), False),
        }
        several = len(args.fused_chunk_rows) > 1
        for rows in args.fused_chunk_rows:
            suffix = f"_rows{rows or default_chunk_rows(loss_type)}" if several else ""
            out[f"fused{suffix}"] = (lambda h, rows=rows: fused_linear_draft_loss(
                h, weight, mask, teacher_logits=teacher, chunk_rows=rows, **common), False)
            if loss_type != "hard_ce":
                out[f"fused_teacher_hidden{suffix}"] = (lambda h, rows=rows: fused_linear_draft_loss(
                    h, weight, mask, teacher_hidden=teacher_hidden, chunk_rows=rows, **common), True)
        liger, why_not = _liger_loss(loss_type, args.temperature)
        if liger is None:
            skipped[loss_type] = why_not
        elif loss_type == "hard_ce":
            out["liger"] = (lambda h: liger(weight, h, labels_ignored), False)
        else:
            out["liger"] = (lambda h: liger(h, weight, teacher_hidden, weight, labels_ignored), True)
        if args.variants:  # "fused" also selects fused_rows<N>
            out = {k: v for k, v in out.items() if k in args.variants or k.split("_rows")[0] in args.variants}
        return out

    results, skipped = {}, {}
    for loss_type in args.loss_types:
        reference = None
        if args.fp64_check:
            reference = _reference_fp64(hidden.detach(), weight, teacher, mask, labels, loss_type, args.topk,
                                        args.temperature)
        per_loss = {}
        for name, (fn, from_hidden) in variants(loss_type).items():
            try:
                result = measure(fn, hidden, args)
            except torch.OutOfMemoryError as error:
                per_loss[name] = {"error": f"out of memory: {str(error).splitlines()[0]}"}
                hidden.grad = None
                torch.cuda.empty_cache()
                continue
            result.pop("time_over_bandwidth_bound", None)
            result.update(bound(loss_type, from_hidden))
            result["time_over_bound"] = round(result["time_ms"] / result["bound_ms"], 2)
            result["bound_ms"] = round(result["bound_ms"], 3)
            if reference is not None:
                hidden.grad = None
                fn(hidden).backward()
                grad = hidden.grad.double()
                result["grad_rel_err_vs_fp64"] = float((grad - reference[1]).norm() / reference[1].norm())
                if name != "liger" or loss_type == "hard_ce":  # Liger's soft_ce is KL: offset by H(p)
                    ref_loss = float(reference[0])
                    result["loss_rel_err_vs_fp64"] = abs(result["loss"] - ref_loss) / abs(ref_loss)
                hidden.grad = None
                del grad
            per_loss[name] = result
            torch.cuda.empty_cache() if device == "cuda" else None
        results[loss_type] = per_loss
        print(json.dumps({loss_type: per_loss}), flush=True)  # progress, in case a later loss fails

    return {
        "config": {
            "mode": "projection", "vocab": vocab, "seq": args.seq, "batch": args.batch, "hidden": hidden_size,
            "chunk_size": args.chunk_size, "fused_chunk_rows": args.fused_chunk_rows, "topk": args.topk,
            "temperature": args.temperature, "dtype": args.dtype, "repeats": args.repeats, "tp": 1,
        },
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "peak_tflops": args.peak_tflops, "bandwidth_gbps": args.bandwidth_gbps,
        "time_method": f"median (and min) wall-clock of forward+backward over {args.repeats} runs after 1 warm-up",
        "memory_method": "max_memory_allocated minus allocated before the step (hidden grad included; inputs and "
                         "teacher logits excluded)" if device == "cuda" else "CPU allocator events (torch.profiler)",
        "results": results,
        "liger_not_run": skipped,
    }


if __name__ == "__main__":
    main()
