"""Draft-head (MTP) training losses over a vocabulary sharded across tensor-parallel ranks.

This module owns :func:`draft_loss`, the loss that teaches a draft head to match the
distribution the rollout engine samples from, and :func:`shift_mask`, the mask of positions
whose prediction target ``shift`` tokens ahead lies in the same sequence.

Memory: the exact losses never materialise ``[B, S, V]`` intermediates beyond the inputs and
the gradient. A custom autograd function walks the sequence in chunks; the forward keeps only
per-position statistics (log-normalisers, a TV coupling term, top-k ids and probabilities) and
the backward recomputes the softmaxes chunk by chunk from them, writing the student gradient in
place. The backward needs no collective: every global quantity it uses was reduced in forward.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from skyrl_mtp.mtp.vocab_parallel import (
    VocabShard,
    all_gather_last_dim,
    all_reduce_max,
    all_reduce_sum,
    group_rank_and_size,
    local_max_and_sumexp,
    owned_local_index,
    rebase,
)

LOSS_TYPES = ("soft_ce", "topk_soft_ce", "hard_ce", "tv")

__all__ = ["LOSS_TYPES", "draft_loss", "draft_loss_from_hidden", "shift_mask"]


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def draft_loss(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    mask: Tensor,
    *,
    loss_type: str,
    labels: Tensor | None = None,
    topk: int | None = None,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    tp_group: dist.ProcessGroup | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Mean draft loss over the positions selected by `mask`: ``sum(loss * mask) / sum(mask)``.

    Args:
        student_logits: ``[B, S, V_local]`` draft-head logits, this rank's contiguous vocabulary
            shard (rank ``r`` holds global columns ``[r * V_local, (r + 1) * V_local)``). Position
            ``t`` must already be aligned with position ``t`` of the teacher. The only input that
            receives a gradient.
        teacher_logits: ``[B, S, V_local]`` target-model logits, same shape and dtype as the
            student. Always treated as detached. Unused (and may be None) for ``hard_ce``.
        mask: ``[B, S]`` weights, normally 0/1 (bool, int or float); identical on all TP ranks.
            Must select at least one position.
        loss_type: one of

            - ``"soft_ce"``: ``H(p, q) = -sum_v p_v log q_v``, exact over the full vocabulary.
            - ``"topk_soft_ce"``: the same over the teacher's global top-`topk` tokens (top-k
              across all TP ranks), with the teacher probabilities renormalised over those k
              tokens and the student log-probabilities taken from the *full-vocabulary*
              log-softmax at those tokens (so mass the student puts elsewhere is penalised).
              Extra memory O(B * S * topk) kept for backward (the candidate all-gather is
              O(B * S * topk * tp_size) for a moment).
            - ``"hard_ce"``: ``-log q[labels]``, e.g. against the sampled tokens.
            - ``"tv"``: total variation ``0.5 * sum_v |p_v - q_v|``, the quantity that bounds the
              draft rejection rate under probabilistic (rejection-sampling) verification.

        labels: ``[B, S]`` integer global token ids, required for ``hard_ce``. Must lie in
            ``[0, vocab_size)`` where `mask` is non-zero; any value (e.g. -100) elsewhere.
        topk: number of teacher tokens for ``topk_soft_ce``, ``1 <= topk <= vocab_size``.
        temperature: sampling temperature ``T > 0``. Both distributions are temperature-scaled:
            ``p = softmax(teacher / T)`` is what the rollout engine samples from, and
            ``q = softmax(student / T)`` because under probabilistic verification vLLM samples
            the draft token from the drafter's logits scaled by the same temperature, so that is
            the distribution whose distance to ``p`` sets the acceptance rate.
        vocab_size: the true vocabulary size; padded columns at or beyond it are excluded from
            every normaliser, top-k and gather. Default ``V_local * tp_size`` (no padding).
        tp_group: the tensor-parallel process group the vocabulary is sharded over; None means
            no TP. Every rank must call with the same shapes, options and mask; ranks whose
            shard is pure padding take part in every collective all the same.
        chunk_size: process the sequence in chunks of this many positions, bounding the extra
            memory of forward and backward by a small multiple of ``[B, chunk_size, V_local]``.
            None processes the whole sequence as one chunk (same code path, same numbers).

    Returns:
        A scalar tensor. Arithmetic is float32 for fp16/bf16/fp32 logits (float64 for float64
        logits); the student gradient comes back in the student's dtype.

    Raises:
        ValueError: on bad arguments (naming the argument and value), before any collective.
    """
    shard = _validate(
        student_logits, teacher_logits, mask, loss_type, labels, topk, temperature, vocab_size,
        tp_group, chunk_size,
    )
    plan = _Plan(
        loss_type=loss_type,
        temperature=float(temperature),
        topk=topk,
        shard=shard,
        chunks=_chunks(student_logits.shape[1], chunk_size),
        compute_dtype=torch.promote_types(student_logits.dtype, torch.float32),
    )
    teacher = teacher_logits.detach() if teacher_logits is not None else None
    per_position = _DraftLossFunction.apply(student_logits, teacher, labels, plan)
    weights = mask.to(per_position.dtype)
    return (per_position * weights).sum() / weights.sum()


def acceptance_probability(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    tp_group: dist.ProcessGroup | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """``[B, S]`` probability that a draft sampled from the student is accepted by rejection
    sampling against the teacher (probabilistic drafting): ``1 - TV(p, q)`` per position, both
    distributions at `temperature`, over the whole (vocab-parallel) vocabulary. No gradient.
    Arguments as in :func:`draft_loss` (every position is computed; no mask)."""
    mask = torch.ones(student_logits.shape[:2], dtype=torch.bool, device=student_logits.device)
    shard = _validate(student_logits, teacher_logits, mask, "tv", None, None, temperature, vocab_size,
                      tp_group, chunk_size)
    plan = _Plan(loss_type="tv", temperature=float(temperature), topk=None, shard=shard,
                 chunks=_chunks(student_logits.shape[1], chunk_size),
                 compute_dtype=torch.promote_types(student_logits.dtype, torch.float32))
    with torch.no_grad():
        tv, _ = _FORWARDS["tv"](student_logits.detach(), teacher_logits.detach(), None, plan)
    return 1.0 - tv


def draft_loss_from_hidden(
    hidden: Tensor,
    weight: Tensor,
    teacher_logits: Tensor | None,
    mask: Tensor,
    *,
    loss_type: str,
    labels: Tensor | None = None,
    topk: int | None = None,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    tp_group: dist.ProcessGroup | None = None,
    chunk_size: int | None = None,
    fused: bool | None = None,
) -> Tensor:
    """:func:`draft_loss` of the draft head's logits ``hidden @ weight^T``, from its hidden states.

    The vocabulary projection and the loss go together here so that on CUDA they can run fused
    (:mod:`skyrl_mtp.mtp.fused_loss`: the ``[B, S, V_local]`` student logits and their gradient
    are never held for all positions); elsewhere the logits are built and :func:`draft_loss`
    (the eager reference) runs on them.

    Args:
        hidden: ``[B, S, H]`` draft-head hidden states, position-aligned with the teacher.
        weight: ``[V_local, H]`` this rank's shard of the output weight. Always detached: the
            draft loss never trains the policy's output layer.
        teacher_logits, mask, loss_type, labels, topk, temperature, vocab_size, tp_group: as in
            :func:`draft_loss` (teacher ``[B, S, V_local]``).
        chunk_size: sequence positions per chunk for the eager path, rows per chunk for the
            fused one (None: the whole sequence eagerly; fused: `fused_loss.default_chunk_rows`).
        fused: True forces the fused path (CUDA with Triton, or ``TRITON_INTERPRET=1``), False
            the eager one; None (default) takes the fused path on CUDA when Triton is importable.

    Returns:
        The masked mean loss (scalar). The gradient w.r.t. `hidden` is the full one on every TP
        rank (summed over the vocabulary shards, as Megatron's column-parallel layer does).
    """
    from skyrl_mtp.mtp import fused_loss

    if fused is None:
        fused = hidden.device.type == "cuda" and fused_loss.fused_available(hidden.device)
    if fused:
        return fused_loss.fused_linear_draft_loss(
            hidden, weight, mask, loss_type=loss_type, teacher_logits=teacher_logits, labels=labels, topk=topk,
            temperature=temperature, vocab_size=vocab_size, tp_group=tp_group, chunk_rows=chunk_size)
    logits = torch.matmul(_ReduceGradOverTP.apply(hidden, tp_group), weight.detach().t())
    return draft_loss(logits, teacher_logits, mask, loss_type=loss_type, labels=labels, topk=topk,
                      temperature=temperature, vocab_size=vocab_size, tp_group=tp_group, chunk_size=chunk_size)


class _ReduceGradOverTP(torch.autograd.Function):
    """Identity whose backward sums the gradient over the TP group: the input is replicated and
    each rank's vocabulary shard contributes part of its gradient."""

    @staticmethod
    def forward(ctx: FunctionCtx, tensor: Tensor, group: dist.ProcessGroup | None) -> Tensor:
        ctx.group = group
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:
        if ctx.group is not None and dist.get_world_size(ctx.group) > 1:
            grad = grad.contiguous()
            dist.all_reduce(grad, group=ctx.group)
        return grad, None


def shift_mask(mask: Tensor, shift: int, cu_seqlens: Tensor | None = None) -> Tensor:
    """Mask of the positions whose target `shift` tokens ahead is valid and in the same sequence.

    ``out[t] = mask[t] and mask[t + shift] and (t + shift is in the same sequence as t)``, where
    "the same sequence" is the same row of an unpacked ``[B, S]`` mask, or the same segment
    ``[cu_seqlens[i], cu_seqlens[i + 1])`` of a packed ``[T]`` or ``[1, T]`` mask. Positions
    whose target falls past the end of their sequence are 0. For non-bool masks "and" is the
    product, so the result has the dtype of `mask` (and, for a 0/1 mask, ``shift = 0`` gives
    `mask` back).

    Args:
        mask: ``[B, S]`` (unpacked) or ``[T]`` / ``[1, T]`` (packed with `cu_seqlens`).
        shift: how many tokens ahead the target lies, ``>= 0``.
        cu_seqlens: 1-D integer cumulative segment boundaries ``[0, l0, l0 + l1, ..., T]``
            (non-decreasing; empty segments allowed), or None for an unpacked mask.
    """
    if not isinstance(shift, numbers.Integral) or isinstance(shift, bool) or shift < 0:
        raise ValueError(f"shift must be an int >= 0; got {shift!r}")
    if not isinstance(mask, Tensor):
        raise ValueError(f"mask must be a torch.Tensor; got {type(mask).__name__}")
    if cu_seqlens is None:
        if mask.dim() != 2:
            raise ValueError(f"mask must have shape [B, S] without cu_seqlens; got shape {tuple(mask.shape)}")
        same_sequence = _within_row(mask.shape[-1], int(shift), mask.device)
    else:
        if mask.dim() not in (1, 2) or (mask.dim() == 2 and mask.shape[0] != 1):
            raise ValueError(f"mask must have shape [T] or [1, T] with cu_seqlens; got shape {tuple(mask.shape)}")
        _check_cu_seqlens(cu_seqlens, mask.shape[-1])
        same_sequence = _within_segment(cu_seqlens.to(device=mask.device, dtype=torch.long), int(shift))
    return _and(_and(mask, _look_ahead(mask, int(shift))), same_sequence.to(mask.dtype))


# --------------------------------------------------------------------------------------------
# shift_mask helpers
# --------------------------------------------------------------------------------------------


def _look_ahead(mask: Tensor, shift: int) -> Tensor:
    """``mask[..., t + shift]`` at position t, 0 past the end of the last dimension."""
    ahead = torch.zeros_like(mask)
    length = mask.shape[-1]
    if shift < length:
        ahead[..., : length - shift] = mask[..., shift:]
    return ahead


def _and(a: Tensor, b: Tensor) -> Tensor:
    """Logical and of two masks of the same dtype, as a product for numeric masks."""
    return a & b if a.dtype == torch.bool else a * b


def _within_row(length: int, shift: int, device: torch.device) -> Tensor:
    """[S] bool: position t's target t + shift is still inside the row."""
    return torch.arange(length, device=device) + shift < length


def _within_segment(cu_seqlens: Tensor, shift: int) -> Tensor:
    """[T] bool: position t's target t + shift lies before the end of t's segment."""
    total = int(cu_seqlens[-1])
    positions = torch.arange(total, device=cu_seqlens.device)
    # right=True skips empty segments: the index is that of the first boundary > t,
    # i.e. the end of the (non-empty) segment holding t.
    segment_end = cu_seqlens[torch.searchsorted(cu_seqlens, positions, right=True)]
    return positions + shift < segment_end


def _check_cu_seqlens(cu_seqlens: Tensor, total: int) -> None:
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        shape = tuple(cu_seqlens.shape) if isinstance(cu_seqlens, Tensor) else type(cu_seqlens).__name__
        raise ValueError(f"cu_seqlens must be a 1-D tensor with at least 2 entries; got {shape}")
    if cu_seqlens.is_floating_point() or cu_seqlens.is_complex() or cu_seqlens.dtype == torch.bool:
        raise ValueError(f"cu_seqlens must be an integer tensor; got dtype {cu_seqlens.dtype}")
    if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != total:
        raise ValueError(
            f"cu_seqlens must start at 0 and end at the packed length {total}; "
            f"got {cu_seqlens.tolist()}"
        )
    if bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
        raise ValueError(f"cu_seqlens must be non-decreasing; got {cu_seqlens.tolist()}")


# --------------------------------------------------------------------------------------------
# Validation (local only: runs before any collective, identically on every rank)
# --------------------------------------------------------------------------------------------


def _validate(
    student: Tensor,
    teacher: Tensor | None,
    mask: Tensor,
    loss_type: str,
    labels: Tensor | None,
    topk: int | None,
    temperature: float,
    vocab_size: int | None,
    tp_group: dist.ProcessGroup | None,
    chunk_size: int | None,
) -> VocabShard:
    """Check every argument and return this rank's vocabulary shard."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}; got {loss_type!r}")
    _check_temperature(temperature)
    if chunk_size is not None and (
        not isinstance(chunk_size, numbers.Integral) or isinstance(chunk_size, bool) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be None or an int >= 1; got {chunk_size!r}")
    _check_logits("student_logits", student)
    if teacher is None:
        if loss_type != "hard_ce":
            raise ValueError(f"teacher_logits is required for loss_type={loss_type!r}; got None")
    else:
        _check_logits("teacher_logits", teacher)
        if teacher.shape != student.shape:
            raise ValueError(
                f"teacher_logits shape {tuple(teacher.shape)} must equal student_logits shape "
                f"{tuple(student.shape)}"
            )
        if teacher.dtype != student.dtype:
            raise ValueError(
                f"teacher_logits dtype {teacher.dtype} must equal student_logits dtype {student.dtype}"
            )
    _check_mask(mask, student)
    rank, size = group_rank_and_size(tp_group)
    shard = VocabShard(
        group=tp_group, rank=rank, size=size, local_size=student.shape[-1],
        vocab_size=_check_vocab_size(vocab_size, student.shape[-1], size),
    )
    if loss_type == "topk_soft_ce":
        _check_topk(topk, shard.vocab_size)
    if loss_type == "hard_ce":
        _check_labels(labels, mask, shard.vocab_size)
    # Data-dependent check last: it is the only one that reads tensor values.
    if not bool(mask.sum() > 0):
        raise ValueError(f"mask must select at least one position (sum(mask) > 0); got sum {mask.sum().item()}")
    return shard


def _check_temperature(temperature: float) -> None:
    if (
        not isinstance(temperature, numbers.Real)
        or isinstance(temperature, bool)
        or not math.isfinite(temperature)
        or temperature <= 0
    ):
        raise ValueError(f"temperature must be a finite number > 0; got {temperature!r}")


def _check_logits(name: str, logits: Tensor) -> None:
    if not isinstance(logits, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor; got {type(logits).__name__}")
    if logits.dim() != 3:
        raise ValueError(f"{name} must have shape [B, S, V_local]; got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor; got dtype {logits.dtype}")


def _check_mask(mask: Tensor, student: Tensor) -> None:
    if not isinstance(mask, Tensor):
        raise ValueError(f"mask must be a torch.Tensor; got {type(mask).__name__}")
    if mask.shape != student.shape[:2]:
        raise ValueError(f"mask must have shape [B, S] = {tuple(student.shape[:2])}; got {tuple(mask.shape)}")
    if mask.is_complex():
        raise ValueError(f"mask must be bool, integer or real; got dtype {mask.dtype}")


def _check_vocab_size(vocab_size: int | None, local_size: int, tp_size: int) -> int:
    padded = local_size * tp_size
    if vocab_size is None:
        vocab_size = padded
    if not isinstance(vocab_size, numbers.Integral) or isinstance(vocab_size, bool) or vocab_size < 1:
        raise ValueError(f"vocab_size must be an int >= 1; got {vocab_size!r}")
    if vocab_size > padded:
        raise ValueError(
            f"vocab_size {vocab_size} exceeds V_local * tp_size = {local_size} * {tp_size} = {padded}"
        )
    return int(vocab_size)


def _check_topk(topk: int | None, vocab_size: int) -> None:
    if not isinstance(topk, numbers.Integral) or isinstance(topk, bool) or not 1 <= topk <= vocab_size:
        raise ValueError(f"topk must be an int with 1 <= topk <= vocab_size ({vocab_size}); got {topk!r}")


def _check_labels(labels: Tensor | None, mask: Tensor, vocab_size: int) -> None:
    if labels is None:
        raise ValueError("labels is required for loss_type='hard_ce'; got None")
    if not isinstance(labels, Tensor):
        raise ValueError(f"labels must be a torch.Tensor; got {type(labels).__name__}")
    if labels.shape != mask.shape:
        raise ValueError(f"labels must have shape [B, S] = {tuple(mask.shape)}; got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor; got dtype {labels.dtype}")
    out_of_range = ((labels < 0) | (labels >= vocab_size)) & (mask != 0)
    if bool(out_of_range.any()):
        bad = labels[out_of_range][0].item()
        raise ValueError(f"labels must lie in [0, vocab_size={vocab_size}) where mask != 0; got {bad}")


def _chunks(length: int, chunk_size: int | None) -> tuple[slice, ...]:
    """Sequence slices of at most `chunk_size` positions (one slice when None)."""
    if chunk_size is None:
        return (slice(0, length),)
    return tuple(slice(start, min(start + chunk_size, length)) for start in range(0, length, chunk_size))


# --------------------------------------------------------------------------------------------
# Autograd function
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    """Everything about one draft_loss call that is not a tensor."""

    loss_type: str
    temperature: float
    topk: int | None
    shard: VocabShard
    chunks: tuple[slice, ...]
    compute_dtype: torch.dtype


class _Saved(NamedTuple):
    """Per-position statistics the backward needs; all O(B * S * topk) at most."""

    student_lse: Tensor | None  # [B, S] log-normaliser of student / T over the global vocab (None: soft_ce, no TP)
    teacher_lse: Tensor | None = None  # [B, S] same for the teacher (soft_ce, tv)
    tv_coupling: Tensor | None = None  # [B, S] sum_v 0.5 * sign(q_v - p_v) * q_v (tv)
    target_ids: Tensor | None = None  # [B, S, k] global ids of a sparse target (hard_ce, topk)
    target_probs: Tensor | None = None  # [B, S, k] its probabilities (sum to 1)


class _DraftLossFunction(torch.autograd.Function):
    """Per-position draft loss ``[B, S]`` whose backward recomputes softmaxes chunk by chunk."""

    @staticmethod
    def forward(
        ctx: FunctionCtx, student: Tensor, teacher: Tensor | None, labels: Tensor | None, plan: _Plan
    ) -> Tensor:
        loss, saved = _FORWARDS[plan.loss_type](student, teacher, labels, plan)
        ctx.plan = plan
        # The inputs are saved by reference (no copy); everything else is per-position.
        needs_teacher = plan.loss_type in ("soft_ce", "tv")
        ctx.save_for_backward(student, teacher if needs_teacher else None, *saved)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_per_position: Tensor) -> tuple[Tensor | None, None, None, None]:
        student, teacher, *rest = ctx.saved_tensors
        plan: _Plan = ctx.plan
        saved = _Saved(*rest)
        shard = plan.shard
        grad = torch.empty_like(student)
        grad[..., shard.num_valid :] = 0  # padding never receives gradient
        if shard.num_valid == 0:
            return grad, None, None, None
        # d loss / d student = (d loss / d (student / T)) / T, times the upstream weight.
        scale = grad_per_position.to(plan.compute_dtype) / plan.temperature
        direction_fn = _DIRECTIONS[plan.loss_type]
        for chunk in plan.chunks:
            direction = direction_fn(student, teacher, saved, plan, chunk)
            grad[:, chunk, : shard.num_valid] = direction.mul_(scale[:, chunk, None])
        return grad, None, None, None


def _scaled(logits: Tensor, chunk: slice, plan: _Plan) -> Tensor:
    """The valid (non-padding) columns of a sequence chunk, in the compute dtype, divided by T.
    Always a fresh tensor (callers work in place on it)."""
    valid = logits[:, chunk, : plan.shard.num_valid]
    if plan.temperature == 1.0:  # the common RL case: one conversion pass instead of convert + divide
        return valid.to(plan.compute_dtype, copy=True)
    return valid.to(plan.compute_dtype) / plan.temperature


def _softmax_chunk(logits: Tensor, lse: Tensor, chunk: slice, plan: _Plan) -> Tensor:
    """``softmax(logits / T)`` on this shard's valid columns of a chunk, from the global lse."""
    # In place: _scaled always returns a fresh tensor (the division allocates one).
    return _scaled(logits, chunk, plan).sub_(lse[:, chunk, None]).exp_()


def _stat_buffer(student: Tensor, plan: _Plan, *leading: int) -> Tensor:
    """An uninitialised ``[*leading, B, S]`` buffer for per-position statistics."""
    return torch.empty(*leading, *student.shape[:2], dtype=plan.compute_dtype, device=student.device)


# --------------------------------------------------------------------------------------------
# Forward passes: (per-position loss [B, S], statistics for backward)
# --------------------------------------------------------------------------------------------


def _soft_ce_forward(
    student: Tensor, teacher: Tensor, labels: Tensor | None, plan: _Plan
) -> tuple[Tensor, _Saved]:
    """``H(p, q) = lse(z) - sum_v p_v z_v`` with ``z = student / T``, in one pass, two collectives."""
    if plan.shard.size == 1:
        return _soft_ce_forward_local(student, teacher, plan)
    local_max = _stat_buffer(student, plan, 2)  # [student, teacher]
    local_sums = _stat_buffer(student, plan, 3)  # [student sumexp, teacher sumexp, teacher-weighted z]
    for chunk in plan.chunks:
        z = _scaled(student, chunk, plan)
        local_max[0, :, chunk], local_sums[0, :, chunk] = local_max_and_sumexp(z)
        local_max[1, :, chunk], local_sums[1, :, chunk], local_sums[2, :, chunk] = _teacher_moments(
            _scaled(teacher, chunk, plan), z
        )
    global_max = all_reduce_max(local_max.clone(), plan.shard)
    # The weighted sum of z was taken relative to the teacher's local max, like its sumexp.
    owner = torch.tensor([0, 1, 1], device=student.device)
    totals = all_reduce_sum(rebase(local_sums, local_max[owner], global_max[owner]), plan.shard)
    student_lse = global_max[0] + totals[0].log()
    teacher_lse = global_max[1] + totals[1].log()
    loss = student_lse - totals[2] / totals[1]
    return loss, _Saved(student_lse=student_lse, teacher_lse=teacher_lse)


def _soft_ce_forward_local(student: Tensor, teacher: Tensor, plan: _Plan) -> tuple[Tensor, _Saved]:
    """Without TP the normalisers need no collective, so each chunk goes through torch's fused
    (log-)softmax kernels, which read the logits once and convert them on the fly: a handful of
    passes over ``[B, chunk, V]`` instead of the dozen the sharded path needs. Nothing is saved:
    the backward recomputes both softmaxes the same way."""
    loss = _stat_buffer(student, plan)
    for chunk in plan.chunks:
        log_q = _local_softmax(student, chunk, plan, log=True)
        loss[:, chunk] = _local_softmax(teacher, chunk, plan).mul_(log_q).sum(dim=-1).neg_()
    return loss, _Saved(student_lse=None)


def _local_softmax(logits: Tensor, chunk: slice, plan: _Plan, log: bool = False) -> Tensor:
    """``(log_)softmax(logits / T)`` over a chunk's valid columns, in the compute dtype (no TP)."""
    x = logits[:, chunk, : plan.shard.num_valid]
    if plan.temperature != 1.0:
        x = x.to(plan.compute_dtype) / plan.temperature
    fn = torch.log_softmax if log else torch.softmax
    return fn(x, dim=-1, dtype=plan.compute_dtype)


def _teacher_moments(y: Tensor, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Local max m of y, ``sum exp(y - m)`` and ``sum exp(y - m) * z`` over the last dim."""
    if y.shape[-1] == 0:
        empty = y.new_zeros(y.shape[:-1])
        return empty - math.inf, empty, empty.clone()
    local_max = y.amax(dim=-1)
    weights = (y - local_max.unsqueeze(-1)).exp_()
    return local_max, weights.sum(dim=-1), weights.mul_(z).sum(dim=-1)


def _tv_forward(
    student: Tensor, teacher: Tensor, labels: Tensor | None, plan: _Plan
) -> tuple[Tensor, _Saved]:
    """``0.5 * sum_v |p_v - q_v|``: a pass for the normalisers, a pass for the distance."""
    local_max = _stat_buffer(student, plan, 2)
    local_sumexp = _stat_buffer(student, plan, 2)
    for chunk in plan.chunks:
        local_max[0, :, chunk], local_sumexp[0, :, chunk] = local_max_and_sumexp(_scaled(student, chunk, plan))
        local_max[1, :, chunk], local_sumexp[1, :, chunk] = local_max_and_sumexp(_scaled(teacher, chunk, plan))
    student_lse, teacher_lse = _global_logsumexp(local_max, local_sumexp, plan.shard)

    local_sums = _stat_buffer(student, plan, 2)  # [sum |q - p|, sum 0.5 * sign(q - p) * q]
    for chunk in plan.chunks:
        q = _softmax_chunk(student, student_lse, chunk, plan)
        diff = _softmax_chunk(teacher, teacher_lse, chunk, plan).neg_().add_(q)  # q - p
        # abs().sum() rather than vector_norm(ord=1): sum() accumulates pairwise, the norm
        # kernel does not, and loses ~1e-5 relative over a 30k+ vocabulary in float32.
        local_sums[0, :, chunk] = diff.abs().sum(dim=-1)
        local_sums[1, :, chunk] = 0.5 * diff.sign_().mul_(q).sum(dim=-1)
    totals = all_reduce_sum(local_sums, plan.shard)
    saved = _Saved(student_lse=student_lse, teacher_lse=teacher_lse, tv_coupling=totals[1])
    return 0.5 * totals[0], saved


def _global_logsumexp(local_max: Tensor, local_sumexp: Tensor, shard: VocabShard) -> Tensor:
    """Global log-sum-exp of stacked streams from per-shard (max, sum exp(x - max))."""
    global_max = all_reduce_max(local_max.clone(), shard)
    return global_max + all_reduce_sum(rebase(local_sumexp, local_max, global_max), shard).log()


def _hard_ce_forward(
    student: Tensor, teacher: Tensor | None, labels: Tensor, plan: _Plan
) -> tuple[Tensor, _Saved]:
    """``-log q[label]``: a sparse target of one token with probability 1."""
    target_ids = labels.to(device=student.device, dtype=torch.long).unsqueeze(-1)
    target_probs = torch.ones(target_ids.shape, dtype=plan.compute_dtype, device=student.device)
    return _sparse_ce_forward(student, target_ids, target_probs, plan)


def _topk_soft_ce_forward(
    student: Tensor, teacher: Tensor, labels: Tensor | None, plan: _Plan
) -> tuple[Tensor, _Saved]:
    """Cross-entropy against the teacher's renormalised global top-k."""
    target_ids, target_probs = _teacher_global_topk(teacher, plan)
    return _sparse_ce_forward(student, target_ids, target_probs, plan)


def _teacher_global_topk(teacher: Tensor, plan: _Plan) -> tuple[Tensor, Tensor]:
    """Global ids ``[B, S, k]`` of the teacher's top-k over the true vocab, and their
    probabilities renormalised over those k tokens (``softmax(top_logits / T)``).

    Each rank offers its local top-min(k, num_valid) (padded with ``-inf`` candidates, so all
    ranks gather equal shapes); the global top-k is the top-k of the gathered candidates. There
    are always >= k real candidates, so a ``-inf`` filler is never chosen.
    """
    shard, k = plan.shard, plan.topk
    batch, length = teacher.shape[:2]
    values = torch.full((batch, length, k), -math.inf, dtype=plan.compute_dtype, device=teacher.device)
    ids = torch.zeros((batch, length, k), dtype=torch.long, device=teacher.device)
    local_k = min(k, shard.num_valid)
    if local_k > 0:
        for chunk in plan.chunks:
            # Top-k of the raw logits: dividing by T > 0 does not change the order.
            chunk_values, chunk_ids = teacher[:, chunk, : shard.num_valid].topk(local_k, dim=-1, sorted=False)
            values[:, chunk, :local_k] = chunk_values
            ids[:, chunk, :local_k] = chunk_ids + shard.offset
    candidates = all_gather_last_dim(values, shard)
    candidate_ids = all_gather_last_dim(ids, shard)
    top_values, position = candidates.topk(k, dim=-1, sorted=False)
    top_ids = candidate_ids.gather(-1, position)
    return top_ids, torch.softmax(top_values / plan.temperature, dim=-1)


def _sparse_ce_forward(
    student: Tensor, target_ids: Tensor, target_probs: Tensor, plan: _Plan
) -> tuple[Tensor, _Saved]:
    """``-sum_i p_i log q[id_i] = lse(z) - sum_i p_i z[id_i]`` for a sparse target (sum p = 1)."""
    local_max = _stat_buffer(student, plan)
    local_sumexp = _stat_buffer(student, plan)
    for chunk in plan.chunks:
        local_max[:, chunk], local_sumexp[:, chunk] = local_max_and_sumexp(_scaled(student, chunk, plan))
    # Each target id is owned by exactly one rank; the others contribute 0 to the sum below.
    index, owned = owned_local_index(target_ids, plan.shard)
    picked = student.gather(-1, index).to(plan.compute_dtype) / plan.temperature
    picked = torch.where(owned, picked, 0.0)

    global_max = all_reduce_max(local_max.clone(), plan.shard)
    # One SUM collective for both the normaliser and the picked logits: [B, S, 1 + k].
    totals = all_reduce_sum(
        torch.cat([rebase(local_sumexp, local_max, global_max).unsqueeze(-1), picked], dim=-1), plan.shard
    )
    student_lse = global_max + totals[..., 0].log()
    loss = student_lse - (target_probs * totals[..., 1:]).sum(dim=-1)
    return loss, _Saved(student_lse=student_lse, target_ids=target_ids, target_probs=target_probs)


_FORWARDS: dict[str, Callable[[Tensor, Tensor | None, Tensor | None, _Plan], tuple[Tensor, _Saved]]] = {
    "soft_ce": _soft_ce_forward,
    "topk_soft_ce": _topk_soft_ce_forward,
    "hard_ce": _hard_ce_forward,
    "tv": _tv_forward,
}


# --------------------------------------------------------------------------------------------
# Backward directions: d loss / d z for one chunk, z = student / T, on this shard's valid columns
# --------------------------------------------------------------------------------------------


def _soft_ce_direction(student: Tensor, teacher: Tensor, saved: _Saved, plan: _Plan, chunk: slice) -> Tensor:
    """``q - p``."""
    if saved.student_lse is None:  # no TP: see _soft_ce_forward_local
        return _local_softmax(student, chunk, plan).sub_(_local_softmax(teacher, chunk, plan))
    q = _softmax_chunk(student, saved.student_lse, chunk, plan)
    return q.sub_(_softmax_chunk(teacher, saved.teacher_lse, chunk, plan))


def _tv_direction(student: Tensor, teacher: Tensor, saved: _Saved, plan: _Plan, chunk: slice) -> Tensor:
    """``q_j * (g_j - sum_v g_v q_v)`` with ``g = 0.5 * sign(q - p)``: the softmax Jacobian
    applied to the subgradient of ``0.5 * |q - p|`` (sign(0) = 0); the sum was reduced in forward.
    """
    q = _softmax_chunk(student, saved.student_lse, chunk, plan)
    g = (q - _softmax_chunk(teacher, saved.teacher_lse, chunk, plan)).sign_().mul_(0.5)
    return q.mul_(g.sub_(saved.tv_coupling[:, chunk, None]))


def _sparse_ce_direction(
    student: Tensor, teacher: Tensor | None, saved: _Saved, plan: _Plan, chunk: slice
) -> Tensor:
    """``q - p_sparse``: the full-vocab softmax minus the target mass on the ids this rank owns."""
    q = _softmax_chunk(student, saved.student_lse, chunk, plan)
    index, owned = owned_local_index(saved.target_ids[:, chunk], plan.shard)
    probs = saved.target_probs[:, chunk]
    return q.scatter_add_(-1, index, torch.where(owned, -probs, torch.zeros_like(probs)))


_DIRECTIONS: dict[str, Callable[[Tensor, Tensor | None, _Saved, _Plan, slice], Tensor]] = {
    "soft_ce": _soft_ce_direction,
    "topk_soft_ce": _sparse_ce_direction,
    "hard_ce": _sparse_ce_direction,
    "tv": _tv_direction,
}
