"""Fused draft-head vocabulary projection + draft loss for CUDA (Triton), vocabulary-parallel.

This module owns :func:`fused_linear_draft_loss`: the draft loss of :mod:`skyrl_mtp.mtp.losses`
(soft_ce, topk_soft_ce, hard_ce, tv; both distributions at temperature T; padded vocabulary;
tensor-parallel vocabulary shards) computed straight from the head's hidden states and the
frozen output weight, with the gradient w.r.t. the hidden states. The student logits are never
held for all tokens: rows are processed in chunks, and only one chunk's ``[rows, V_local]``
logits exist at a time (reused in place for their gradient).

Per chunk:

1. ``logits = hidden_chunk @ W_valid^T`` (cuBLAS; padded rows of W are never multiplied);
2. one Triton pass over vocabulary tiles with an online softmax: per-row max and sum-exp of the
   student (and of the teacher, plus the teacher-weighted student logit for soft_ce);
3. torch collectives over the TP group turn these per-shard statistics into global ones
   (max, then rebased sums; the top-k candidates for topk_soft_ce; tv's coupling term needs
   one more Triton pass and one more sum);
4. one Triton pass writes ``d loss / d logits`` over the logits, in place, in the same tiling;
5. ``grad_hidden_chunk = dlogits @ W_valid`` (cuBLAS).

The gradient is computed in forward (the loss is a scalar whose upstream gradient is a scalar),
so the projection is multiplied twice, not three times; the backward only scales it. The
hidden-state gradient is summed over the TP group (what Megatron's column-parallel layer does
in its backward), so every rank returns the full gradient.

Why logits tiles through HBM instead of a kernel that keeps them in registers: at the shapes
that matter (H >= 2048, V ~ 152K) the two projections are ~4*N*V*H FLOPs against ~2*N*V bytes
of logits traffic per pass, an arithmetic intensity far above the GPU's ridge point, so the
time is bound by the matmuls, which cuBLAS runs near peak; what a chunk buys is bounded memory.

The teacher is either the policy's logits (``teacher_logits``, what the RL objective already
has for the policy loss) or its hidden states (``teacher_hidden``, recomputed per chunk with the
same weight: one more projection, but no ``[tokens, V]`` teacher in memory).

Triton is imported lazily: :func:`fused_available` says whether this path can run. On CPU the
eager path of :mod:`skyrl_mtp.mtp.losses` is used and stays the reference; under
``TRITON_INTERPRET=1`` the kernels also run on CPU tensors (slowly), which the tests use.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Protocol

import torch
import torch.distributed as dist
from torch import Tensor

from skyrl_mtp.mtp.topk import merge_topk, row_topk
from skyrl_mtp.mtp.vocab_parallel import (
    VocabShard,
    all_gather_last_dim,
    all_reduce_max,
    all_reduce_sum,
    group_rank_and_size,
    owned_local_index,
)

# Rows per chunk: bounds the one chunk's logits buffer (2048 x 151,936 bf16 = 594 MiB) while
# keeping the matmuls large enough to run at cuBLAS's full rate. topk_soft_ce takes 4096: its
# per-chunk top-k and host sync amortise better over longer chunks (H200, H = 2048, V = 151,936,
# S = 8192, row_topk: 1.53x its compute bound at 4096 rows vs 1.68x at 2048, for 1,254 vs 642 MiB
# of extra memory; docs/gpu_results/2026-12-03_h200_s3/topk_chunk_rows.json).
DEFAULT_CHUNK_ROWS = 2048
DEFAULT_CHUNK_ROWS_BY_LOSS = {"topk_soft_ce": 4096}


def default_chunk_rows(loss_type: str) -> int:
    """Rows per chunk the fused path uses for `loss_type` when none is given."""
    return DEFAULT_CHUNK_ROWS_BY_LOSS.get(loss_type, DEFAULT_CHUNK_ROWS)


_BLOCK_V = 2048  # vocabulary tile of the Triton passes (one row per program, fp32 registers)

_MODE_SOFT_CE, _MODE_SPARSE, _MODE_TV = 0, 1, 2
_MODES = {"soft_ce": _MODE_SOFT_CE, "topk_soft_ce": _MODE_SPARSE, "hard_ce": _MODE_SPARSE, "tv": _MODE_TV}


# --------------------------------------------------------------------------------------------
# Availability and lazy Triton kernels
# --------------------------------------------------------------------------------------------


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=1)
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def fused_available(device: torch.device) -> bool:
    """Whether the fused path can run on `device`: CUDA with Triton importable, or any device
    under Triton's interpreter (``TRITON_INTERPRET=1``, for tests)."""
    if not _triton_importable():
        return False
    return device.type == "cuda" or _interpreting()


@functools.lru_cache(maxsize=1)
def _kernels():
    """Compile-on-first-use Triton kernels (imported here so the module imports without Triton)."""
    try:
        import triton
        import triton.language as tl
    except ImportError as error:  # pragma: no cover - guarded by fused_available
        raise ImportError(
            "the fused draft loss needs Triton (pip install triton); use the eager path "
            "(skyrl_mtp.mtp.losses.draft_loss) without it"
        ) from error

    @triton.jit
    def row_stats(
        s_ptr, t_ptr, out_ptr, n_rows, n_cols, s_stride, t_stride, inv_temp,
        HAS_TEACHER: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """Per row, over this shard's columns, online over tiles: student max and
        sum exp(z - max); teacher max, sum exp(y - max) and sum exp(y - max) * z.
        out is [5, n_rows] fp32. The caller guarantees n_cols > 0."""
        row = tl.program_id(0).to(tl.int64)
        s_row = s_ptr + row * s_stride
        t_row = t_ptr + row * t_stride
        # Running scalars rescaled once per tile (one exp per element, not two as a lane-wise
        # running max would need: the exp unit, not HBM, would then bound the pass).
        m_s = float("-inf")
        d_s = 0.0
        m_t = float("-inf")
        d_t = 0.0
        w_t = 0.0
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            ok = cols < n_cols
            z = tl.load(s_row + cols, mask=ok, other=float("-inf")).to(tl.float32) * inv_temp
            new_m = tl.maximum(m_s, tl.max(z, axis=0))
            d_s = d_s * tl.exp(m_s - new_m) + tl.sum(tl.exp(z - new_m), axis=0)
            m_s = new_m
            if HAS_TEACHER:
                y = tl.load(t_row + cols, mask=ok, other=float("-inf")).to(tl.float32) * inv_temp
                new_mt = tl.maximum(m_t, tl.max(y, axis=0))
                rescale = tl.exp(m_t - new_mt)
                e = tl.exp(y - new_mt)
                d_t = d_t * rescale + tl.sum(e, axis=0)
                w_t = w_t * rescale + tl.sum(tl.where(ok, e * z, 0.0), axis=0)
                m_t = new_mt
        tl.store(out_ptr + row, m_s)
        tl.store(out_ptr + n_rows + row, d_s)
        if HAS_TEACHER:
            tl.store(out_ptr + 2 * n_rows + row, m_t)
            tl.store(out_ptr + 3 * n_rows + row, d_t)
            tl.store(out_ptr + 4 * n_rows + row, w_t)

    @triton.jit
    def tv_sums(
        s_ptr, t_ptr, lse_ptr, out_ptr, n_rows, n_cols, s_stride, t_stride, inv_temp, BLOCK: tl.constexpr,
    ):
        """Per row: sum |q - p| and sum 0.5 * sign(q - p) * q over this shard. out is [2, n_rows]."""
        row = tl.program_id(0).to(tl.int64)
        lse_s = tl.load(lse_ptr + row)
        lse_t = tl.load(lse_ptr + n_rows + row)
        acc_abs = tl.zeros([BLOCK], tl.float32)
        acc_cpl = tl.zeros([BLOCK], tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            ok = cols < n_cols
            z = tl.load(s_ptr + row * s_stride + cols, mask=ok, other=float("-inf")).to(tl.float32)
            y = tl.load(t_ptr + row * t_stride + cols, mask=ok, other=float("-inf")).to(tl.float32)
            q = tl.exp(z * inv_temp - lse_s)
            diff = q - tl.exp(y * inv_temp - lse_t)
            acc_abs += tl.abs(diff)
            acc_cpl += tl.where(diff > 0, 0.5, tl.where(diff < 0, -0.5, 0.0)) * q
        tl.store(out_ptr + row, tl.sum(acc_abs, axis=0))
        tl.store(out_ptr + n_rows + row, tl.sum(acc_cpl, axis=0))

    @triton.jit
    def logit_grad(
        s_ptr, t_ptr, lse_ptr, coupling_ptr, scale_ptr, n_rows, n_cols, s_stride, t_stride, inv_temp,
        MODE: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """Overwrite the student logits with d loss / d logits (scale = weight / T per row):
        soft_ce q - p; sparse q (the target mass is subtracted afterwards); tv q * (g - c)."""
        row = tl.program_id(0).to(tl.int64)
        lse_s = tl.load(lse_ptr + row)
        scale = tl.load(scale_ptr + row)
        if MODE != 1:
            lse_t = tl.load(lse_ptr + n_rows + row)
        if MODE == 2:
            coupling = tl.load(coupling_ptr + row)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            ok = cols < n_cols
            s_addr = s_ptr + row * s_stride + cols
            z = tl.load(s_addr, mask=ok, other=float("-inf")).to(tl.float32)
            q = tl.exp(z * inv_temp - lse_s)
            if MODE == 1:
                grad = q
            else:
                y = tl.load(t_ptr + row * t_stride + cols, mask=ok, other=float("-inf")).to(tl.float32)
                p = tl.exp(y * inv_temp - lse_t)
                if MODE == 0:
                    grad = q - p
                else:
                    diff = q - p
                    grad = q * (tl.where(diff > 0, 0.5, tl.where(diff < 0, -0.5, 0.0)) - coupling)
            tl.store(s_addr, (grad * scale).to(s_ptr.dtype.element_ty), mask=ok)

    return row_stats, tv_sums, logit_grad


# --------------------------------------------------------------------------------------------
# Collectives between the passes (torch.distributed, or a stand-in for tests)
# --------------------------------------------------------------------------------------------


class Collectives(Protocol):
    """The three reductions the passes need, over the vocabulary's TP group, in place."""

    def all_reduce_max(self, tensor: Tensor) -> Tensor: ...
    def all_reduce_sum(self, tensor: Tensor) -> Tensor: ...
    def all_gather_last_dim(self, tensor: Tensor) -> Tensor: ...


class DistCollectives:
    """torch.distributed over the shard's group: :mod:`skyrl_mtp.mtp.vocab_parallel`'s collectives
    (no-ops for a group of one)."""

    def __init__(self, shard: VocabShard) -> None:
        self.shard = shard

    def all_reduce_max(self, tensor: Tensor) -> Tensor:
        return all_reduce_max(tensor, self.shard)

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        return all_reduce_sum(tensor, self.shard)

    def all_gather_last_dim(self, tensor: Tensor) -> Tensor:
        return all_gather_last_dim(tensor, self.shard)


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------


def fused_linear_draft_loss(
    hidden: Tensor,
    weight: Tensor,
    mask: Tensor,
    *,
    loss_type: str,
    teacher_logits: Tensor | None = None,
    teacher_hidden: Tensor | None = None,
    labels: Tensor | None = None,
    topk: int | None = None,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    tp_group: dist.ProcessGroup | None = None,
    chunk_rows: int | None = None,
    collectives: Collectives | None = None,
    tp_rank_and_size: tuple[int, int] | None = None,
) -> Tensor:
    """Masked mean draft loss of ``logits = hidden @ weight^T``, as
    :func:`skyrl_mtp.mtp.losses.draft_loss` defines it, fused with the projection.

    Args:
        hidden: ``[*, H]`` draft-head hidden states; the only input that receives a gradient.
        weight: ``[V_local, H]`` this rank's shard of the output weight; treated as frozen
            (detached): the draft loss must not train the policy's output layer.
        mask: ``[*]`` per-position weights (same leading shape as `hidden`).
        loss_type, labels, topk, temperature, vocab_size, tp_group: as in ``draft_loss``
            (labels ``[*]`` global ids for hard_ce).
        teacher_logits: ``[*, V_local]`` the policy's logits shard (detached).
        teacher_hidden: ``[*, H]`` the policy's hidden states instead; teacher logits are then
            recomputed per chunk with `weight`. Exactly one of the two for the losses that need
            a teacher; neither for hard_ce.
        chunk_rows: rows per chunk (default :func:`default_chunk_rows` of `loss_type`).
        collectives, tp_rank_and_size: replace torch.distributed over `tp_group` (tests emulate
            TP with threads on one device); normally left None.

    Returns:
        A float32 scalar; backward gives ``d loss / d hidden`` in `hidden`'s dtype.
    """
    from skyrl_mtp.mtp.losses import LOSS_TYPES, _check_temperature, _check_topk, _check_vocab_size

    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}; got {loss_type!r}")
    _check_temperature(temperature)
    if not fused_available(hidden.device):
        raise RuntimeError(
            "the fused draft loss runs on CUDA with Triton installed (or under TRITON_INTERPRET=1); "
            f"got device {hidden.device}, Triton importable: {_triton_importable()}"
        )
    if hidden.dim() < 2 or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"hidden [*, H] and weight [V_local, H] do not match: {tuple(hidden.shape)}, {tuple(weight.shape)}")
    lead = hidden.shape[:-1]
    if mask.shape != lead:
        raise ValueError(f"mask must have shape {tuple(lead)}; got {tuple(mask.shape)}")
    needs_teacher = loss_type != "hard_ce"
    if needs_teacher and (teacher_logits is None) == (teacher_hidden is None):
        raise ValueError(f"loss_type={loss_type!r} needs exactly one of teacher_logits, teacher_hidden")
    if teacher_logits is not None and teacher_logits.shape != (*lead, weight.shape[0]):
        raise ValueError(
            f"teacher_logits must have shape {(*lead, weight.shape[0])}; got {tuple(teacher_logits.shape)}")
    if teacher_hidden is not None and teacher_hidden.shape != hidden.shape:
        raise ValueError(f"teacher_hidden must have shape {tuple(hidden.shape)}; got {tuple(teacher_hidden.shape)}")
    if loss_type == "hard_ce" and (labels is None or labels.shape != lead):
        raise ValueError(f"labels of shape {tuple(lead)} are required for hard_ce")
    if chunk_rows is not None and (not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be None or an int >= 1; got {chunk_rows!r}")

    rank, size = tp_rank_and_size if tp_rank_and_size is not None else group_rank_and_size(tp_group)
    shard = VocabShard(group=tp_group, rank=rank, size=size, local_size=weight.shape[0],
                       vocab_size=_check_vocab_size(vocab_size, weight.shape[0], size))
    if loss_type == "topk_soft_ce":
        _check_topk(topk, shard.vocab_size)
    comm = collectives if collectives is not None else DistCollectives(shard)
    weights = mask.to(torch.float32)
    total = weights.sum()
    if not bool(total > 0):
        raise ValueError("mask must select at least one position (sum(mask) > 0)")
    # [B, S, ...] views, no copies: the kernels take a row stride, so a teacher sliced along the
    # sequence (the policy's logits shifted by the head's depth) is read in place, batch row by
    # batch row. Only more than two leading dimensions are flattened (reshape may copy).
    def seq3d(t: Tensor | None, per_row: bool) -> Tensor | None:
        if t is None:
            return None
        t = t.detach()
        lead_dims = t.dim() - (0 if per_row else 1)
        if lead_dims == 1:
            t = t.unsqueeze(0)
        elif lead_dims > 2:
            t = t.reshape(-1, *t.shape[lead_dims - 1:])
        return t if per_row or t.stride(-1) == 1 else t.contiguous()

    hidden3d = hidden if hidden.dim() == 3 else (
        hidden.unsqueeze(0) if hidden.dim() == 2 else hidden.reshape(-1, *hidden.shape[-2:]))
    return _FusedDraftLoss.apply(
        hidden3d, weight.detach(), seq3d(teacher_logits, False), seq3d(teacher_hidden, False),
        seq3d(labels, True), seq3d(weights.reshape(lead) / total, True),
        (loss_type, float(temperature), topk, shard, chunk_rows or default_chunk_rows(loss_type), comm),
    ).reshape(())


class _FusedDraftLoss(torch.autograd.Function):
    """Loss in forward together with d loss / d hidden; backward scales the stored gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, teacher_logits, teacher_hidden, labels, row_weights, options):
        loss, grad_hidden = _loss_and_grad(hidden.detach(), weight, teacher_logits, teacher_hidden, labels,
                                           row_weights, *options)
        ctx.save_for_backward(grad_hidden)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_loss.to(grad_hidden.dtype), None, None, None, None, None, None


def _loss_and_grad(
    hidden: Tensor, weight: Tensor, teacher_logits: Tensor | None, teacher_hidden: Tensor | None,
    labels: Tensor | None, row_weights: Tensor, loss_type: str, temperature: float, topk: int | None,
    shard: VocabShard, chunk_rows: int, comm: Collectives,
) -> tuple[Tensor, Tensor]:
    """(weighted loss sum, grad w.r.t. hidden [B, S, H]); row_weights [B, S] already sum to 1.
    Every rank walks the same (batch row, chunk) sequence, so the collectives line up."""
    device = hidden.device
    grad_hidden = torch.zeros(hidden.shape, dtype=hidden.dtype, device=device)
    loss = torch.zeros((), dtype=torch.float32, device=device)
    for b in range(hidden.shape[0]):
        loss += _sequence_loss_and_grad(
            hidden[b], weight, None if teacher_logits is None else teacher_logits[b],
            None if teacher_hidden is None else teacher_hidden[b], None if labels is None else labels[b],
            row_weights[b], grad_hidden[b], loss_type, temperature, topk, shard, chunk_rows, comm)
    # Each rank holds its vocabulary shard's share; the head's input is replicated over TP.
    grad_hidden = comm.all_reduce_sum(grad_hidden)
    return loss, grad_hidden


def _sequence_loss_and_grad(
    hidden: Tensor, weight: Tensor, teacher_logits: Tensor | None, teacher_hidden: Tensor | None,
    labels: Tensor | None, row_weights: Tensor, grad_hidden: Tensor, loss_type: str, temperature: float,
    topk: int | None, shard: VocabShard, chunk_rows: int, comm: Collectives,
) -> Tensor:
    """One sequence [S, H]: its weighted loss sum; its gradient written into grad_hidden [S, H]."""
    rows, device = hidden.shape[0], hidden.device
    num_valid = shard.num_valid
    w_valid = weight[:num_valid]  # padded vocabulary rows are never multiplied
    loss = torch.zeros((), dtype=torch.float32, device=device)
    inv_temp = 1.0 / temperature
    mode = _MODES[loss_type]
    row_stats, tv_sums, logit_grad = _kernels() if num_valid > 0 else (None, None, None)
    for start in range(0, rows, chunk_rows):
        end = min(start + chunk_rows, rows)
        n = end - start
        # --- pass 0: this shard's logits for the chunk (the only [n, V_local] buffer)
        student = hidden[start:end] @ w_valid.t()
        teacher = None
        if teacher_logits is not None:
            teacher = teacher_logits[start:end, :num_valid]
        elif teacher_hidden is not None:
            teacher = teacher_hidden[start:end] @ w_valid.t()
        has_teacher = mode != _MODE_SPARSE
        # --- pass 1: per-shard statistics, online over vocabulary tiles
        stats = torch.empty(5, n, dtype=torch.float32, device=device)
        if num_valid > 0:
            row_stats[(n,)](
                student, teacher if has_teacher else student, stats, n, num_valid, student.stride(0),
                (teacher if has_teacher else student).stride(0), inv_temp, HAS_TEACHER=has_teacher, BLOCK=_BLOCK_V)
        else:  # all-padding shard: neutral statistics, same collectives as every other rank
            stats[0::2].fill_(-math.inf)
            stats[1::2].zero_()
            stats[4].zero_()
        chunk_weights = row_weights[start:end]
        scale = chunk_weights * inv_temp
        if mode == _MODE_SPARSE:
            chunk_loss, lse, fix = _sparse_reduce(student, teacher, labels, stats, loss_type, start, end, topk,
                                                  temperature, shard, comm)
        else:
            maxima = comm.all_reduce_max(stats[0::2][:2].clone())  # [student, teacher]
            sums = stats[[1, 3, 4]] * torch.exp(stats[[0, 2, 2]] - maxima[[0, 1, 1]])
            sums = comm.all_reduce_sum(sums)
            lse = torch.stack([maxima[0] + sums[0].log(), maxima[1] + sums[1].log()])
            coupling = None
            if mode == _MODE_SOFT_CE:
                chunk_loss = lse[0] - sums[2] / sums[1]
            else:
                tv = torch.zeros(2, n, dtype=torch.float32, device=device)
                if num_valid > 0:
                    tv_sums[(n,)](student, teacher, lse, tv, n, num_valid, student.stride(0), teacher.stride(0),
                                  inv_temp, BLOCK=_BLOCK_V)
                tv = comm.all_reduce_sum(tv)
                chunk_loss, coupling = 0.5 * tv[0], tv[1]
        loss += (chunk_loss * chunk_weights).sum()
        if num_valid == 0:
            del student, teacher
            continue
        # --- pass 2: d loss / d logits written over the logits, same tiling
        logit_grad[(n,)](
            student, teacher if has_teacher else student, lse.contiguous(),
            coupling if mode == _MODE_TV else scale, scale, n, num_valid, student.stride(0),
            (teacher if has_teacher else student).stride(0), inv_temp, MODE=mode, BLOCK=_BLOCK_V)
        if mode == _MODE_SPARSE:
            fix_rows, fix_cols, fix_values = fix
            # q - p at the owned target ids, from fp32 values (the kernel wrote q there).
            student[fix_rows, fix_cols] = (fix_values * scale[fix_rows]).to(student.dtype)
        # --- pass 3: this shard's share of the hidden-state gradient
        torch.mm(student, w_valid, out=grad_hidden[start:end])
        # Free this chunk's buffers before the next chunk's are allocated (peak: one chunk).
        del student, teacher
    return loss


def _sparse_reduce(
    student: Tensor, teacher: Tensor | None, labels: Tensor | None, stats: Tensor, loss_type: str, start: int,
    end: int, topk: int | None, temperature: float, shard: VocabShard, comm: Collectives,
):
    """hard_ce / topk_soft_ce for one chunk: the target ids and probabilities (global top-k of
    the teacher for topk), the student's global lse, the loss, and the (row, col, q - p) of the
    owned target ids the gradient pass must correct."""
    n, device = end - start, student.device
    if loss_type == "hard_ce":
        target_ids = labels[start:end].to(device=device, dtype=torch.long).unsqueeze(-1)
        target_probs = torch.ones(target_ids.shape, dtype=torch.float32, device=device)
    else:
        target_ids, target_probs = _global_topk(teacher, n, topk, temperature, shard, comm)
    index, owned = owned_local_index(target_ids, shard)
    if shard.num_valid > 0:
        picked = student.gather(-1, index).float() / temperature
    else:
        picked = torch.zeros(target_ids.shape, dtype=torch.float32, device=device)
    picked = torch.where(owned, picked, 0.0)
    global_max = comm.all_reduce_max(stats[0].clone())
    totals = comm.all_reduce_sum(
        torch.cat([(stats[1] * torch.exp(stats[0] - global_max)).unsqueeze(-1), picked], dim=-1))
    lse_s = global_max + totals[:, 0].log()
    chunk_loss = lse_s - (target_probs * totals[:, 1:]).sum(-1)
    fix_rows, fix_slots = owned.nonzero(as_tuple=True)
    fix_values = torch.exp(picked[fix_rows, fix_slots] - lse_s[fix_rows]) - target_probs[fix_rows, fix_slots]
    fix = (fix_rows, index[fix_rows, fix_slots], fix_values)
    return chunk_loss, lse_s.unsqueeze(0), fix


def _global_topk(teacher: Tensor, n: int, k: int, temperature: float, shard: VocabShard, comm: Collectives):
    """Global ids [n, k] of the teacher's top-k over the true vocabulary and their probabilities
    renormalised over those k (each rank offers its local top-min(k, num_valid), ``-inf``-padded
    so every rank gathers equal shapes; there are always >= k real candidates). The local top-k
    is :func:`skyrl_mtp.mtp.topk.row_topk` (rows split across programs; faster than torch.topk,
    whose ~2.3 ms per 2,048 x 151,936 bf16 rows on an H200 was a third of this loss's time)."""
    device = teacher.device
    values = torch.full((n, k), -math.inf, dtype=torch.float32, device=device)
    # Padding candidates carry an id past the vocabulary: they lose every tie to a real one.
    ids = torch.full((n, k), shard.vocab_size, dtype=torch.long, device=device)
    local_k = min(k, shard.num_valid)
    if local_k > 0:
        top_values, top_ids = row_topk(teacher, local_k)
        values[:, :local_k] = top_values
        ids[:, :local_k] = top_ids + shard.offset
    if shard.size == 1:
        best, target_ids = values, ids
    else:
        best, target_ids = merge_topk(comm.all_gather_last_dim(values), comm.all_gather_last_dim(ids), k)
    return target_ids, torch.softmax(best / temperature, dim=-1)
