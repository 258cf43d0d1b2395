"""Tests for skyrl_mtp.mtp.fused_loss (the fused projection + draft loss) against a float64
reference over the full, unpadded vocabulary: loss and hidden-state gradient for every loss
type, bf16 and fp32 inputs, a padded vocabulary and a shard that is all padding. Tensor
parallelism is emulated on one device: each rank is a thread holding its slice of the weight and
teacher, and the collectives between the passes are exchanged between the threads.

Runs on CUDA when Triton is importable, and on CPU under Triton's interpreter
(``TRITON_INTERPRET=1`` with Triton importable; small sizes only). Skipped otherwise (CI has
neither). The eager path's tests (tests/mtp/test_losses.py) stay the reference for CPU.
"""

from __future__ import annotations

import os
import threading

import pytest
import torch

from skyrl_mtp.mtp import fused_loss, topk
from skyrl_mtp.mtp.losses import LOSS_TYPES, draft_loss_from_hidden


def _device() -> str | None:
    if not fused_loss._triton_importable():
        return None
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "cpu"
    return None


DEVICE = _device()
pytestmark = pytest.mark.skipif(DEVICE is None, reason="needs Triton and CUDA, or Triton with TRITON_INTERPRET=1")

# Interpreter: tiny shapes, and a small vocabulary tile so the online softmax crosses tiles.
if DEVICE == "cuda":
    ROWS, HIDDEN, LOCAL_VOCAB, CHUNK, BLOCK = 600, 256, 5000, 256, None
else:
    ROWS, HIDDEN, LOCAL_VOCAB, CHUNK, BLOCK = 10, 16, 20, 4, 8
TOPK = 5


class _Serialised:
    """A kernel whose launches hold one lock: Triton's interpreter patches triton.language
    globally during a launch, and a first launch compiles, so two rank threads must not launch
    at the same time (on CUDA a launch is asynchronous: the lock is held only while enqueuing)."""

    lock = threading.Lock()

    def __init__(self, kernel) -> None:
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            with self.lock:
                return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.fixture(autouse=True)
def _tile(monkeypatch):
    if BLOCK is not None:
        monkeypatch.setattr(fused_loss, "_BLOCK_V", BLOCK)
    if DEVICE is not None:
        kernels = tuple(_Serialised(k) for k in fused_loss._kernels())
        monkeypatch.setattr(fused_loss, "_kernels", lambda: kernels)
        topk_kernels = tuple(_Serialised(k) for k in topk._kernels())
        monkeypatch.setattr(topk, "_kernels", lambda: topk_kernels)


# --------------------------------------------------------------------------------------------
# Float64 reference and inputs
# --------------------------------------------------------------------------------------------


def reference(hidden, weight, teacher_logits, mask, labels, loss_type, vocab_size, temperature):
    """(loss, d loss / d hidden) in float64 over the first `vocab_size` columns."""
    h = hidden.double().requires_grad_(True)
    z = (h @ weight[:vocab_size].double().t()) / temperature
    y = teacher_logits[:, :vocab_size].double() / temperature
    log_q = torch.log_softmax(z, dim=-1)
    p = torch.softmax(y, dim=-1)
    if loss_type == "soft_ce":
        per_row = -(p * log_q).sum(-1)
    elif loss_type == "topk_soft_ce":
        # Ties (bf16 teachers have them) go to the lowest id, as the fused path promises.
        ids = torch.sort(y, dim=-1, descending=True, stable=True).indices[:, :TOPK]
        top = y.gather(-1, ids)
        per_row = -(torch.softmax(top, dim=-1) * log_q.gather(-1, ids)).sum(-1)
    elif loss_type == "hard_ce":
        per_row = -log_q.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    else:
        per_row = 0.5 * (p - log_q.exp()).abs().sum(-1)
    w = mask.double()
    loss = (per_row * w).sum() / w.sum()
    (grad,) = torch.autograd.grad(loss, h)
    return loss.detach(), grad


def make_inputs(seed, padded_vocab, vocab_size, dtype, teacher_hidden=False):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(ROWS, HIDDEN, generator=gen)
    weight = torch.randn(padded_vocab, HIDDEN, generator=gen) * (3.0 / HIDDEN**0.5)
    weight[vocab_size:] = 5.0  # padding rows: any leak into a softmax or the gradient would show
    if teacher_hidden:
        t_hidden = torch.randn(ROWS, HIDDEN, generator=gen)
        teacher = t_hidden.to(dtype) @ weight.to(dtype).t()
    else:
        t_hidden = None
        teacher = 3.0 * torch.randn(ROWS, padded_vocab, generator=gen)
        teacher[:, vocab_size:] = 60.0
    mask = (torch.rand(ROWS, generator=gen) > 0.3).float()
    mask[0] = 1.0
    labels = torch.randint(0, vocab_size, (ROWS,), generator=gen)
    labels[mask == 0] = -100
    cast = lambda t: None if t is None else t.to(dtype).to(DEVICE)  # noqa: E731
    return cast(hidden), cast(weight), cast(teacher), cast(t_hidden), mask.to(DEVICE), labels.to(DEVICE)


# --------------------------------------------------------------------------------------------
# TP emulation: one thread per rank, collectives exchanged through shared slots
# --------------------------------------------------------------------------------------------


class _Exchange:
    def __init__(self, size: int) -> None:
        self.size = size
        self.barrier = threading.Barrier(size, timeout=120)
        self.slots: list[torch.Tensor | None] = [None] * size


class ThreadCollectives:
    """The fused loss's collectives between threads standing for TP ranks (sums in rank order)."""

    def __init__(self, exchange: _Exchange, rank: int) -> None:
        self.exchange, self.rank = exchange, rank

    def _parts(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        ex = self.exchange
        ex.slots[self.rank] = tensor.clone()
        ex.barrier.wait()
        parts = list(ex.slots)
        ex.barrier.wait()  # every rank has read the slots before the next exchange overwrites them
        return parts

    def all_reduce_max(self, tensor):
        return tensor.copy_(torch.stack(self._parts(tensor)).amax(0))

    def all_reduce_sum(self, tensor):
        parts = self._parts(tensor)
        total = parts[0].clone()
        for part in parts[1:]:
            total += part
        return tensor.copy_(total)

    def all_gather_last_dim(self, tensor):
        return torch.cat(self._parts(tensor), dim=-1)


def run_emulated_tp(tp, hidden, weight, teacher, t_hidden, mask, labels, **options):
    """Every rank's (loss, hidden gradient), each rank given its contiguous vocabulary slice."""
    local = weight.shape[0] // tp
    exchange = _Exchange(tp)
    results: list = [None] * tp
    errors: list[BaseException] = []

    def rank_fn(rank: int) -> None:
        try:
            cols = slice(rank * local, (rank + 1) * local)
            h = hidden.clone().requires_grad_(True)
            loss = fused_loss.fused_linear_draft_loss(
                h, weight[cols], mask, teacher_logits=None if t_hidden is not None else teacher[:, cols],
                teacher_hidden=t_hidden, labels=labels, collectives=ThreadCollectives(exchange, rank),
                tp_rank_and_size=(rank, tp), **options)
            loss.backward()
            results[rank] = (loss.detach(), h.grad)
        except BaseException as error:  # noqa: BLE001 - re-raised in the main thread
            errors.append(error)
            exchange.barrier.abort()

    threads = [threading.Thread(target=rank_fn, args=(r,)) for r in range(tp)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------

# (tp, padded vocab, true vocab): no padding; padding on the last rank; rank 2 all padding.
LAYOUTS = [(1, LOCAL_VOCAB, LOCAL_VOCAB), (2, 2 * LOCAL_VOCAB, 2 * LOCAL_VOCAB - 3),
           (3, 3 * LOCAL_VOCAB, 2 * LOCAL_VOCAB - 3)]
if DEVICE == "cpu":  # the interpreter is slow: tp=3 alone covers padding and an all-padding shard
    LAYOUTS = [LAYOUTS[0], LAYOUTS[2]]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm())


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("tp,padded,vocab", LAYOUTS)
@pytest.mark.parametrize("dtype,temperature", [(torch.float32, 0.7), (torch.bfloat16, 1.0)])
def test_matches_float64_reference(loss_type, tp, padded, vocab, dtype, temperature):
    hidden, weight, teacher, _, mask, labels = make_inputs(1, padded, vocab, dtype)
    ref_loss, ref_grad = reference(hidden.cpu(), weight.cpu(), teacher.cpu(), mask.cpu(), labels.cpu(), loss_type,
                                   vocab, temperature)
    results = run_emulated_tp(tp, hidden, weight, teacher, None, mask, labels, loss_type=loss_type, topk=TOPK,
                              temperature=temperature, vocab_size=vocab, chunk_rows=CHUNK)
    # fp32: only summation order differs. bf16: the logits and their gradient are rounded to bf16,
    # as on the eager path (bf16 logits, draft_loss, autograd through the matmul), whose own error
    # against float64 is the bound: the fused path must be no worse (plus a sanity cap).
    if dtype == torch.float32:
        loss_tol, grad_tol = 1e-5 * abs(float(ref_loss)), 1e-4
    else:
        h = hidden.clone().requires_grad_(True)
        eager = draft_loss_from_hidden(h[None], weight, teacher[None], mask[None], loss_type=loss_type,
                                       labels=labels[None], topk=TOPK, temperature=temperature, vocab_size=vocab,
                                       fused=False)
        eager.backward()
        loss_tol = 1.5 * abs(float(eager) - float(ref_loss)) + 1e-3 * abs(float(ref_loss))
        grad_tol = min(1.5 * _rel(h.grad, ref_grad) + 1e-3, 0.15)
    for rank, (loss, grad) in enumerate(results):
        case = f"{loss_type} tp={tp} rank={rank} {dtype}"
        assert grad.dtype == dtype and grad.shape == hidden.shape, case
        assert torch.isfinite(loss) and torch.isfinite(grad).all(), case
        assert abs(float(loss) - float(ref_loss)) <= loss_tol, (case, float(loss), float(ref_loss), loss_tol)
        assert _rel(grad, ref_grad) <= grad_tol, (case, _rel(grad, ref_grad), grad_tol)


@pytest.mark.parametrize("loss_type", ["soft_ce", "topk_soft_ce", "tv"])
def test_teacher_hidden_equals_teacher_logits(loss_type):
    """Recomputing the teacher per chunk from its hidden states gives the reference result."""
    tp, padded, vocab = LAYOUTS[-1]
    hidden, weight, teacher, t_hidden, mask, labels = make_inputs(2, padded, vocab, torch.float32, teacher_hidden=True)
    ref_loss, ref_grad = reference(hidden.cpu(), weight.cpu(), teacher.cpu(), mask.cpu(), labels.cpu(), loss_type,
                                   vocab, 1.0)
    for loss, grad in run_emulated_tp(tp, hidden, weight, teacher, t_hidden, mask, labels, loss_type=loss_type,
                                      topk=TOPK, vocab_size=vocab, chunk_rows=CHUNK):
        assert abs(float(loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))
        assert _rel(grad, ref_grad) <= 1e-4


def test_dispatch_forced_fused_equals_eager_fp32():
    hidden, weight, teacher, _, mask, labels = make_inputs(3, LOCAL_VOCAB, LOCAL_VOCAB - 2, torch.float32)
    out = {}
    for fused in (True, False):
        h = hidden.clone()[None].requires_grad_(True)
        loss = draft_loss_from_hidden(h, weight, teacher[None], mask[None], loss_type="tv", vocab_size=LOCAL_VOCAB - 2,
                                      temperature=0.8, chunk_size=CHUNK, fused=fused)
        loss.backward()
        out[fused] = (loss.detach(), h.grad)
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-5, atol=0)
    torch.testing.assert_close(out[True][1], out[False][1], rtol=1e-4, atol=1e-7)


def test_weight_and_teacher_get_no_gradient():
    hidden, weight, teacher, _, mask, labels = make_inputs(4, LOCAL_VOCAB, LOCAL_VOCAB, torch.float32)
    weight.requires_grad_(True)
    teacher.requires_grad_(True)
    h = hidden.clone().requires_grad_(True)
    fused_loss.fused_linear_draft_loss(h, weight, mask, loss_type="soft_ce", teacher_logits=teacher).backward()
    assert weight.grad is None and teacher.grad is None and h.grad is not None


def test_missing_teacher_raises():
    hidden, weight, teacher, _, mask, labels = make_inputs(5, LOCAL_VOCAB, LOCAL_VOCAB, torch.float32)
    with pytest.raises(ValueError, match="teacher"):
        fused_loss.fused_linear_draft_loss(hidden, weight, mask, loss_type="tv")
    with pytest.raises(ValueError, match="labels"):
        fused_loss.fused_linear_draft_loss(hidden, weight, mask, loss_type="hard_ce")


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_batched_strided_inputs_match_reference(loss_type):
    """[B, S, H] hidden from an [S, B, H] layout and a teacher sliced along the sequence (as the
    objective passes them: views, not copies) give the reference loss and gradient."""
    batch, depth = 2, 1
    hidden, weight, _, _, mask, labels = make_inputs(6, LOCAL_VOCAB, LOCAL_VOCAB - 3, torch.float32)
    length = ROWS // batch
    gen = torch.Generator().manual_seed(7)
    teacher_full = (3.0 * torch.randn(batch, length + depth, LOCAL_VOCAB, generator=gen)).to(DEVICE)
    teacher = teacher_full[:, depth:]  # not viewable as [B * S, V]
    h_sbh = hidden.view(batch, length, HIDDEN).transpose(0, 1).contiguous()  # [S, B, H]
    h = h_sbh.clone().requires_grad_(True)
    mask3, labels3 = mask.view(batch, length), labels.view(batch, length)
    loss = fused_loss.fused_linear_draft_loss(h.transpose(0, 1), weight, mask3, loss_type=loss_type,
                                              teacher_logits=None if loss_type == "hard_ce" else teacher,
                                              labels=labels3, topk=TOPK, vocab_size=LOCAL_VOCAB - 3, chunk_rows=CHUNK)
    loss.backward()
    ref_loss, ref_grad = reference(hidden.cpu(), weight.cpu(), teacher.reshape(ROWS, -1).cpu(), mask.cpu(),
                                   labels.cpu(), loss_type, LOCAL_VOCAB - 3, 1.0)
    assert abs(float(loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))
    assert _rel(h.grad.transpose(0, 1).reshape(ROWS, HIDDEN), ref_grad) <= 1e-4
