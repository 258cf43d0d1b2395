"""Exact top-k along long rows (a vocabulary's teacher logits), ties toward the lowest column.

This module owns :func:`row_topk`, the teacher top-k of the fused topk_soft_ce loss
(:mod:`skyrl_mtp.mtp.fused_loss`), and :func:`merge_topk`, the merge of the TP ranks' top-k.
torch.topk over 4,096 x 151,936 bf16 logits takes ~4.5 ms on an H200 (~270 GB/s: its radix
select walks each row once per digit). This reads each row twice at close to full bandwidth
instead, with each row split across programs:

1. ``segment_top``, one program per (row, segment of ``seg`` columns): the segment's two
   largest values. They are distinct elements of the row, so the k-th largest of all the
   offers, ``tau``, is a lower bound on the row's k-th largest value: every top-k element is
   >= tau. ``row_tau`` sorts each row's offers to find it;
2. ``collect``, one program per (row, segment): each element >= tau (a little over k of them
   on logits) takes a slot of a per-row buffer from an atomic counter and writes a 64-bit key
   there: the value's order-preserving bits, then the complemented column;
3. ``select``, one program per row: sorts the buffer's keys and writes the first k, decoded.
   Keys are unique, so the result does not depend on the order the atomics handed out slots.

A row with more than ``capacity`` elements >= tau (a constant row, say) is redone by the same
key top-k in torch over the whole row, as is everything off CUDA without Triton's interpreter:
every path returns the same ids. Rows must not hold NaN.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

_LOW_BITS = 0xFFFFFFFF  # the complemented column sits in a key's low 32 bits
_MAX_SEG = 1024  # columns per program; smaller when a row has too few segments for k
_MIN_SEG = 16
_OFFERS = 2  # values per segment: the second keeps tau tight when the top mass clusters in ids
_WARPS = 2  # per segment program (fewer threads per 1,024 columns ran faster on the H200)
_FALLBACK_ROWS = 256  # rows per torch key top-k (an int64 [rows, n_cols] buffer)
_MAX_K = 256  # above it select's one-program sort (8k keys) grows past what fits in registers


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
    top, ids, counts = _candidates(values, k, *plan)
    overflow = (counts > _capacity(k)).nonzero().squeeze(-1)  # the one host sync
    if overflow.numel():
        top[overflow], ids[overflow] = _key_topk(values[overflow], k)
    return top, ids


def _candidates(values: Tensor, k: int, seg: int, n_seg: int) -> tuple[Tensor, Tensor, Tensor]:
    """The kernels: (top [n, k], ids [n, k], counts [n] of elements >= tau); rows whose count
    exceeds the capacity have garbage in top and ids."""
    n, n_cols = values.shape
    segment_top, row_tau, collect, select = _kernels()
    device = values.device
    rows = _rows_per_program(n, device)
    blocks = -(-n // rows)
    n_offers = n_seg * _OFFERS
    offers = torch.empty((n, n_offers), dtype=torch.float32, device=device)
    segment_top[(blocks, n_seg)](values, offers, n, n_cols, values.stride(0), n_seg, SEG=seg, ROWS=rows,
                                 num_warps=_WARPS)
    tau = torch.empty(n, dtype=torch.float32, device=device)
    row_tau[(blocks,)](offers, tau, n, n_offers, k, BLOCK=_next_power_of_2(n_offers), ROWS=rows)
    capacity = _capacity(k)
    counts = torch.zeros(n, dtype=torch.int32, device=device)
    keys = torch.full((n, capacity), torch.iinfo(torch.int64).min, dtype=torch.int64, device=device)
    collect[(blocks, n_seg)](values, tau, counts, keys, n, n_cols, values.stride(0), capacity, SEG=seg, ROWS=rows,
                             num_warps=_WARPS)
    top = torch.empty((n, k), dtype=torch.float32, device=device)
    ids = torch.empty((n, k), dtype=torch.int64, device=device)
    select[(blocks,)](keys, top, ids, n, k, CAPACITY=capacity, ROWS=rows)
    return top, ids, counts


def _rows_per_program(n: int, device: torch.device) -> int:
    """One row per program on a GPU (what was measured); under Triton's interpreter, which runs
    programs one by one in Python, up to 64 rows per program, as its sorts cost per program."""
    return 1 if device.type == "cuda" else min(64, _next_power_of_2(n))


def _next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _segment_plan(n_cols: int, k: int) -> tuple[int, int] | None:
    """(columns per segment, segments): the widest power-of-two segment whose offers number at
    least 2k (so tau is well above the row's bulk), or None when the row is too short for it or
    k is over _MAX_K (the torch key path then)."""
    if k > _MAX_K:
        return None
    seg = _MAX_SEG
    while seg >= _MIN_SEG:
        n_seg = math.ceil(n_cols / seg)
        if n_seg * _OFFERS >= 2 * k:
            return seg, n_seg
        seg //= 2
    return None


def _capacity(k: int) -> int:
    """Slots per row for the elements >= tau (a power of two): ~1.1k on iid logits, ~6k with
    the top mass in one block of ids (scripts/bench_topk.py), 8k before falling back."""
    return max(64, _next_power_of_2(8 * k))


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

    # Every kernel takes ROWS rows per program ([ROWS, ...] blocks; 1 on a GPU).
    @triton.jit
    def segment_top(x_ptr, out_ptr, n_rows, n_cols, x_stride, n_seg, SEG: tl.constexpr, ROWS: tl.constexpr):
        """out[row, 2 * seg + (0, 1)]: the segment's largest value and its second largest (the
        same value again when it occurs twice; -inf past the row)."""
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        row_ok = rows < n_rows
        rows = rows.to(tl.int64)
        seg = tl.program_id(1)
        cols = seg * SEG + tl.arange(0, SEG)
        inside = row_ok[:, None] & (cols < n_cols)[None, :]
        x = tl.load(x_ptr + rows[:, None] * x_stride + cols[None, :], mask=inside, other=float("-inf"))
        x = x.to(tl.float32)
        top = tl.max(x, axis=1)
        at_top = x == top[:, None]
        second = tl.max(tl.where(at_top, float("-inf"), x), axis=1)
        second = tl.where(tl.sum(at_top.to(tl.int32), axis=1) > 1, top, second)
        out = out_ptr + (rows * n_seg + seg) * 2
        tl.store(out, top, mask=row_ok)
        tl.store(out + 1, second, mask=row_ok)

    @triton.jit
    def row_tau(offers_ptr, tau_ptr, n_rows, n_offers, k, BLOCK: tl.constexpr, ROWS: tl.constexpr):
        """tau[row]: the k-th largest of the row's offers."""
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        row_ok = rows < n_rows
        rows = rows.to(tl.int64)
        index = tl.arange(0, BLOCK)
        offers = tl.load(offers_ptr + rows[:, None] * n_offers + index[None, :],
                         mask=row_ok[:, None] & (index < n_offers)[None, :], other=float("-inf"))
        ranked = tl.sort(offers, dim=1, descending=True)
        tl.store(tau_ptr + rows, tl.max(tl.where(index[None, :] == k - 1, ranked, float("-inf")), axis=1),
                 mask=row_ok)

    @triton.jit
    def collect(x_ptr, tau_ptr, count_ptr, key_ptr, n_rows, n_cols, x_stride, capacity, SEG: tl.constexpr,
                ROWS: tl.constexpr):
        """Each element >= tau[row] takes a slot from count[row] (one atomic per element: a
        segment holds a few at most) and writes its key (as _order_keys) unless past capacity."""
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        row_ok = rows < n_rows
        rows = rows.to(tl.int64)
        cols = tl.program_id(1) * SEG + tl.arange(0, SEG)
        inside = row_ok[:, None] & (cols < n_cols)[None, :]
        x = tl.load(x_ptr + rows[:, None] * x_stride + cols[None, :], mask=inside, other=float("-inf"))
        x = x.to(tl.float32)
        tau = tl.load(tau_ptr + rows, mask=row_ok, other=float("inf"))
        take = (x >= tau[:, None]) & inside
        counters = count_ptr + rows[:, None] + tl.zeros_like(cols)[None, :]
        slot = tl.atomic_add(counters, 1, mask=take, sem="relaxed")
        bits = tl.where(x == 0.0, 0.0, x).to(tl.int32, bitcast=True)
        ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)
        key = (ordered << 32) + (4294967295 - cols.to(tl.int64))[None, :]
        tl.store(key_ptr + rows[:, None] * capacity + slot, key, mask=take & (slot < capacity))

    @triton.jit
    def select(key_ptr, top_ptr, ids_ptr, n_rows, k, CAPACITY: tl.constexpr, ROWS: tl.constexpr):
        """The row's k largest keys, decoded: top[row, :k] values, ids[row, :k] columns."""
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        row_ok = rows < n_rows
        rows = rows.to(tl.int64)
        index = tl.arange(0, CAPACITY)
        keys = tl.load(key_ptr + rows[:, None] * CAPACITY + index[None, :], mask=row_ok[:, None], other=0)
        ranked = tl.sort(keys, dim=1, descending=True)
        ordered = (ranked >> 32).to(tl.int32)
        value = tl.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered).to(tl.float32, bitcast=True)
        first = row_ok[:, None] & (index < k)[None, :]
        out = rows[:, None] * k + index[None, :]
        tl.store(top_ptr + out, value, mask=first)
        tl.store(ids_ptr + out, 4294967295 - (ranked & 4294967295), mask=first)

    return segment_top, row_tau, collect, select
