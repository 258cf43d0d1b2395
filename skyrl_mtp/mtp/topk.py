"""Exact top-k along long rows (a vocabulary's teacher logits), ties toward the lowest column.

This module owns :func:`row_topk`, the teacher top-k of the fused topk_soft_ce loss
(:mod:`skyrl_mtp.mtp.fused_loss`). torch.topk over 2,048 x 151,936 bf16 logits takes ~2.3 ms
on an H200 (~270 GB/s: its radix select walks each row once per digit). This reads each row
twice at close to full bandwidth instead, with the row split across programs:

1. one Triton program per (row, segment of ``seg`` columns) writes its segment's ``per_seg``
   largest values. They are distinct elements of the row, so the k-th largest of them, ``tau``,
   is a lower bound on the row's k-th largest value: every top-k element is >= tau;
2. one program per (row, segment) appends its elements >= tau (a few times k of them on
   logits) to a per-row buffer of ``capacity`` slots, through an atomic counter per row, as
   64-bit keys: the value's order-preserving bits, then the complemented column;
3. ``torch.topk(k, sorted=True)`` over the ``[rows, capacity]`` keys. Keys are unique, so the
   result does not depend on the order the atomics appended them in (deterministic).

A row with more than ``capacity`` elements >= tau (a constant row, say) goes through the same
key top-k in torch over the whole row, as does everything off CUDA without Triton's
interpreter: every path returns the same ids. Rows must not hold NaN.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

_LOW_BITS = 0xFFFFFFFF  # the complemented column sits in a key's low 32 bits
_MAX_SEG = 1024  # columns per program; smaller when a row has too few segments for k
_MIN_SEG = 16
_PER_SEG = 2  # values each segment offers to tau: 2 keeps tau tight when the mass clusters
_FALLBACK_ROWS = 256  # rows per torch key top-k (an int64 [rows, n_cols] buffer)


def row_topk(values: Tensor, k: int, use_triton: bool = True) -> tuple[Tensor, Tensor]:
    """The k largest entries of each row of `values` ([n, n_cols], unit column stride, any row
    stride), ties broken toward the lowest column (+0.0 equals -0.0). `use_triton` takes the
    segment kernels (CUDA, or any device under ``TRITON_INTERPRET=1``); the caller checks that
    Triton can run there (the fused loss has, :func:`skyrl_mtp.mtp.fused_loss.fused_available`).

    Returns ``(top float32 [n, k], ids int64 [n, k])``, each row in descending order.
    """
    if values.dim() != 2 or values.stride(-1) != 1:
        raise ValueError(f"values must be [n, n_cols] with unit column stride; got shape "
                         f"{tuple(values.shape)}, strides {values.stride()}")
    n, n_cols = values.shape
    if not 1 <= k <= n_cols:
        raise ValueError(f"k must be in [1, {n_cols}] (the row length); got {k}")
    plan = _segment_plan(n_cols, k)
    if plan is None or n == 0 or not use_triton:
        return _key_topk(values, k)
    keys, counts = _candidates(values, k, *plan)
    top, ids = _decode(keys.topk(k, dim=-1, sorted=True).values)
    overflow = (counts > keys.shape[1]).nonzero().squeeze(-1)  # the one host sync
    if overflow.numel():
        top[overflow], ids[overflow] = _key_topk(values[overflow], k)
    return top, ids


def _candidates(values: Tensor, k: int, seg: int, n_seg: int) -> tuple[Tensor, Tensor]:
    """Steps 1 and 2: (keys [n, capacity] of the elements >= tau, -2^63 in unused slots;
    counts [n] of elements >= tau, which may exceed capacity)."""
    n, n_cols = values.shape
    segment_top, collect = _kernels()
    device = values.device
    offers = torch.empty((n, n_seg * _PER_SEG), dtype=torch.float32, device=device)
    segment_top[(n, n_seg)](values, offers, n_cols, values.stride(0), n_seg, SEG=seg, PER_SEG=_PER_SEG)
    tau = offers.topk(k, dim=-1, sorted=False).values.amin(dim=-1)
    capacity = _capacity(k)
    counts = torch.zeros(n, dtype=torch.int32, device=device)
    keys = torch.full((n, capacity), torch.iinfo(torch.int64).min, dtype=torch.int64, device=device)
    collect[(n, n_seg)](values, tau, counts, keys, n_cols, values.stride(0), capacity, SEG=seg)
    return keys, counts


def _segment_plan(n_cols: int, k: int) -> tuple[int, int] | None:
    """(columns per segment, segments): the widest power-of-two segment whose offers number at
    least 2k (so tau is well above the row's bulk), or None when the row is too short for it."""
    seg = _MAX_SEG
    while seg >= _MIN_SEG:
        n_seg = math.ceil(n_cols / seg)
        if n_seg * _PER_SEG >= 2 * k:
            return seg, n_seg
        seg //= 2
    return None


def _capacity(k: int) -> int:
    """Slots per row for the elements >= tau: ~2k expected on logits, 8k before falling back."""
    return max(256, 1 << (8 * k - 1).bit_length())


def _order_keys(values: Tensor, columns: Tensor | None = None) -> Tensor:
    """int64 keys that sort like (value, -column): the float32 bits made order-preserving as a
    signed int (negatives flip their magnitude bits) in the high half, the complemented column
    (``arange`` when not given; < 2^32) in the low half. Zeros are made +0.0 first, so -0.0 ties
    with +0.0 as torch.topk has it."""
    as_float = values.float()
    as_float = torch.where(as_float == 0, 0.0, as_float)
    bits = as_float.view(torch.int32)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()
    if columns is None:
        columns = torch.arange(values.shape[-1], device=values.device)
    return (ordered << 32) + (_LOW_BITS - columns)


def _decode(keys: Tensor) -> tuple[Tensor, Tensor]:
    """(float32 values, columns) back from :func:`_order_keys` keys (the inverse map is exact)."""
    ordered = (keys >> 32).int()
    values = torch.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered).view(torch.float32)
    return values, _LOW_BITS - (keys & _LOW_BITS)


def merge_topk(values: Tensor, ids: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest of candidates (values, ids) [n, m] per row, ties toward the lowest id: the
    merge of the TP ranks' local top-k, so the global choice breaks ties as each rank's does.
    Returns (values float32 [n, k], ids int64 [n, k]) in descending order."""
    return _decode(_order_keys(values, ids).topk(k, dim=-1, sorted=True).values)


def _key_topk(values: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The same top-k by keys in torch, a block of rows at a time (bounded memory)."""
    top = torch.empty((values.shape[0], k), dtype=torch.float32, device=values.device)
    ids = torch.empty((values.shape[0], k), dtype=torch.long, device=values.device)
    for start in range(0, values.shape[0], _FALLBACK_ROWS):
        block = slice(start, start + _FALLBACK_ROWS)
        top[block], ids[block] = _decode(_order_keys(values[block]).topk(k, dim=-1, sorted=True).values)
    return top, ids


@functools.lru_cache(maxsize=1)
def _kernels():
    """Compile-on-first-use Triton kernels (the module imports without Triton)."""
    import triton
    import triton.language as tl

    @triton.jit
    def segment_top(x_ptr, out_ptr, n_cols, x_stride, n_seg, SEG: tl.constexpr, PER_SEG: tl.constexpr):
        """out[row, seg * PER_SEG + j]: the segment's j-th largest value (-inf past the row)."""
        row = tl.program_id(0).to(tl.int64)
        seg = tl.program_id(1)
        offsets = tl.arange(0, SEG)
        cols = seg * SEG + offsets
        x = tl.load(x_ptr + row * x_stride + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        out = out_ptr + (row * n_seg + seg) * PER_SEG
        for j in tl.static_range(PER_SEG):
            top, where = tl.max(x, axis=0, return_indices=True)
            tl.store(out + j, top)
            x = tl.where(offsets == where, float("-inf"), x)  # one element out, not its ties

    @triton.jit
    def collect(x_ptr, tau_ptr, count_ptr, key_ptr, n_cols, x_stride, capacity, SEG: tl.constexpr):
        """Append this segment's elements >= tau[row] to key[row, :capacity] as order keys
        (the same as _order_keys); count[row] ends as the row's total, slots past capacity dropped."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * SEG + tl.arange(0, SEG)
        inside = cols < n_cols
        x = tl.load(x_ptr + row * x_stride + cols, mask=inside, other=float("-inf")).to(tl.float32)
        take = (x >= tl.load(tau_ptr + row)) & inside
        found = tl.sum(take.to(tl.int32), axis=0)
        if found > 0:
            base = tl.atomic_add(count_ptr + row, found)
            slot = base + tl.cumsum(take.to(tl.int32), axis=0) - 1
            bits = tl.where(x == 0.0, 0.0, x).to(tl.int32, bitcast=True)
            ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)
            key = (ordered << 32) + (4294967295 - cols.to(tl.int64))
            tl.store(key_ptr + row * capacity + slot, key, mask=take & (slot < capacity))

    return segment_top, collect
