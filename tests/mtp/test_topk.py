"""Tests for skyrl_mtp.mtp.topk.row_topk (and merge_topk, the TP merge) against a float64
numpy reference that sorts each row by (value descending, column ascending): the ids and
values, with ties (bf16 rounding, a constant row, +0.0 / -0.0), -inf entries, fp32 input, a
row-strided view and rows so short the segment plan falls back to torch.

The torch key path runs everywhere. The Triton kernels run on CUDA, or on CPU under Triton's
interpreter: without CUDA, ``test_triton_kernels_under_interpreter`` reruns this file's Triton
tests in a subprocess with ``TRITON_INTERPRET=1`` (the interpreter must be on before the
kernels are built), so CI covers them whenever Triton is importable (vLLM's xgrammar brings it).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from skyrl_mtp.mtp import topk as topk_module
from skyrl_mtp.mtp.fused_loss import _triton_importable, fused_available
from skyrl_mtp.mtp.topk import row_topk

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_HERE = _triton_importable() and fused_available(torch.device(DEVICE))


def reference(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values float32, ids) by a stable float64 sort: descending value, then ascending column."""
    rows = values.double().cpu().numpy()
    rows = np.where(rows == 0, 0.0, rows)  # -0.0 ties with +0.0
    ids = np.stack([np.lexsort((np.arange(row.size), -row))[:k] for row in rows])
    ids = torch.from_numpy(ids)
    return values.cpu().float().gather(-1, ids), ids


def tied_rows(rows: int, cols: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Rows with many exact ties (integers in [-6, 6]), a row of +0.0 / -0.0, a constant row and
    a row with -inf entries, as a view with a row stride longer than the row."""
    generator = torch.Generator().manual_seed(seed)
    values = (torch.randn(rows, cols + 7, generator=generator) * 3).round()
    values[1, :cols] = 0.0
    values[1, 0:cols:3] = -0.0
    values[2] = 4.0
    values[3, : cols // 2] = -float("inf")
    return values.to(dtype=dtype, device=DEVICE)[:, :cols]


def _check(values: torch.Tensor, k: int, use_triton: bool) -> None:
    top, ids = row_topk(values, k, use_triton=use_triton)
    ref_top, ref_ids = reference(values, k)
    assert ids.dtype == torch.long and top.dtype == torch.float32
    torch.testing.assert_close(ids.cpu(), ref_ids, rtol=0, atol=0)
    torch.testing.assert_close(top.cpu(), ref_top, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("k", [1, 7, 40])
def test_key_path_matches_reference(dtype, k):
    _check(tied_rows(9, 300, dtype), k, use_triton=False)


def test_key_path_walks_rows_in_blocks(monkeypatch):
    monkeypatch.setattr(topk_module, "_FALLBACK_ROWS", 2)
    _check(tied_rows(5, 64, torch.bfloat16, seed=1), 5, use_triton=False)


def test_merge_of_shard_topks_equals_topk_of_the_whole_row():
    # Three "ranks" each offer their shard's top-k (global ids); ties across shards are common
    # (integer values) and must go to the lowest global id, as row_topk does within a shard.
    values = tied_rows(6, 90, torch.bfloat16, seed=4).cpu()
    values[5, :85] = -float("inf")  # 5 finite values: the top 8 holds three -inf (ids 0, 1, 2)
    k = 8
    offers = [row_topk(values[:, 30 * rank:30 * (rank + 1)], k, use_triton=False) for rank in range(3)]
    candidates = torch.cat([top for top, _ in offers], dim=-1)
    ids = torch.cat([ids + 30 * rank for rank, (_, ids) in enumerate(offers)], dim=-1)
    # A padding candidate (-inf, id past the vocabulary) loses ties to a real -inf.
    candidates = torch.cat([candidates, torch.full((6, 2), -float("inf"))], dim=-1)
    ids = torch.cat([ids, torch.full((6, 2), 90)], dim=-1)
    top, merged = topk_module.merge_topk(candidates, ids, k)
    ref_top, ref_ids = reference(values, k)
    torch.testing.assert_close(merged, ref_ids, rtol=0, atol=0)
    torch.testing.assert_close(top, ref_top, rtol=0, atol=0)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="k must be in"):
        row_topk(torch.zeros(2, 5), 6)
    with pytest.raises(ValueError, match="unit column stride"):
        row_topk(torch.zeros(5, 2).t(), 1)


def test_segment_plan():
    # 151,936 columns, k = 64: 1,024-column segments (149 of them, 298 offers >= 2k).
    assert topk_module._segment_plan(151_936, 64) == (1024, 149)
    # A TP shard of 18,992 columns: segments shrink until the offers reach 2k.
    assert topk_module._segment_plan(18_992, 64) == (256, 75)
    assert topk_module._segment_plan(300, 40) is None  # 19 segments of 16 give 38 < 80 offers
    assert topk_module._segment_plan(151_936, 257) is None  # over _MAX_K: the torch key path


triton_only = pytest.mark.skipif(not TRITON_HERE, reason="needs Triton with CUDA, or TRITON_INTERPRET=1")


@triton_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("k", [1, 7, 40])
def test_triton_matches_reference(dtype, k):
    # k = 40 has no segment plan at 300 columns: it checks the fall-through to the key path.
    _check(tied_rows(9, 300, dtype), k, use_triton=True)


@triton_only
def test_triton_counts_cover_the_top_k_and_overflow_falls_back():
    values = tied_rows(6, 300, torch.bfloat16, seed=2)
    k = 7
    top, ids, counts = topk_module._candidates(values, k, *topk_module._segment_plan(300, k))
    capacity = topk_module._capacity(k)
    # Rows 1 (zeros) and 2 (constant): every element >= tau, more than the buffer holds.
    assert counts[1].item() == counts[2].item() == 300 > capacity
    ref_top, ref_ids = reference(values, k)
    for row in (0, 3, 4, 5):
        kth = ref_top[row, -1]
        # tau <= the k-th value: everything >= the k-th value was counted, and it fit.
        assert int((values[row].float().cpu() >= kth).sum()) <= counts[row].item() <= capacity
        assert torch.equal(ids[row].cpu(), ref_ids[row]) and torch.equal(top[row].cpu(), ref_top[row])
    _check(values, k, use_triton=True)  # and the overflowed rows come out right


@triton_only
def test_triton_large_rows_many_segments():
    generator = torch.Generator().manual_seed(3)
    values = (torch.randn(3, 5000, generator=generator) * 3).to(torch.bfloat16).to(DEVICE)
    _check(values, 16, use_triton=True)


@pytest.mark.skipif(DEVICE == "cuda" or not _triton_importable() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="runs the Triton tests on CPU under the interpreter (CUDA runs them directly)")
def test_triton_kernels_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "triton and not interpreter"],
        env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout, done.stdout[-2000:]
