"""Tests for skyrl_mtp.mtp.losses: draft_loss against a float64 full-vocabulary reference
(single process and vocabulary-parallel over gloo with padded shards), shift_mask against a
loop reference, bad-input errors, teacher detachment, chunking invariance and memory behaviour.
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from skyrl_mtp.mtp.losses import LOSS_TYPES, draft_loss, draft_loss_from_hidden, shift_mask

LOCAL_VOCAB = 8
WORKER_TIMEOUT_S = 120.0


# --------------------------------------------------------------------------------------------
# Float64 reference: a plain re-implementation over the full (unpadded) vocabulary
# --------------------------------------------------------------------------------------------


def reference_per_position(
    student: torch.Tensor,
    teacher: torch.Tensor,
    loss_type: str,
    labels: torch.Tensor | None,
    topk: int | None,
    temperature: float,
) -> torch.Tensor:
    """Per-position loss on [B, S, V] float64 logits; q and p both at the same temperature."""
    log_q = torch.log_softmax(student / temperature, dim=-1)
    p = torch.softmax(teacher / temperature, dim=-1)
    if loss_type == "soft_ce":
        return -(p * log_q).sum(-1)
    if loss_type == "topk_soft_ce":
        top_logits, top_ids = teacher.topk(topk, dim=-1)
        return -(torch.softmax(top_logits / temperature, dim=-1) * log_q.gather(-1, top_ids)).sum(-1)
    if loss_type == "hard_ce":
        # Masked-out positions may carry -100: any in-range id works there (weight 0).
        ids = labels.clamp(0, student.shape[-1] - 1)
        return -log_q.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    if loss_type == "tv":
        return 0.5 * (p - log_q.exp()).abs().sum(-1)
    raise AssertionError(loss_type)


def reference_loss_and_grad(
    student_full: torch.Tensor,
    teacher_full: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss_type: str,
    vocab_size: int,
    labels: torch.Tensor | None = None,
    topk: int | None = None,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, grad w.r.t. the padded student [B, S, V_padded]) in float64."""
    student = student_full[..., :vocab_size].double().requires_grad_(True)
    teacher = teacher_full[..., :vocab_size].double()
    per_position = reference_per_position(student, teacher, loss_type, labels, topk, temperature)
    weights = mask.double()
    loss = (per_position * weights).sum() / weights.sum()
    (grad,) = torch.autograd.grad(loss, student)
    padded_grad = torch.zeros(student_full.shape, dtype=torch.float64)
    padded_grad[..., :vocab_size] = grad
    return loss.detach(), padded_grad


def make_inputs(
    seed: int, batch: int, length: int, padded_vocab: int, vocab_size: int, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(student, teacher, mask with zeros, labels with -100 where masked), identical on all ranks.

    Padding columns hold large junk values so that any leak into a softmax would show.
    """
    gen = torch.Generator().manual_seed(seed)
    student = 3.0 * torch.randn(batch, length, padded_vocab, generator=gen)
    teacher = 3.0 * torch.randn(batch, length, padded_vocab, generator=gen)
    student[..., vocab_size:] = 50.0
    teacher[..., vocab_size:] = 60.0
    mask = (torch.rand(batch, length, generator=gen) > 0.3).float()
    mask[0, 0] = 1.0
    mask[-1, -1] = 0.0
    labels = torch.randint(0, vocab_size, (batch, length), generator=gen)
    labels[mask == 0] = -100
    return student.to(dtype), teacher.to(dtype), mask, labels


def assert_matches_reference(
    loss: torch.Tensor, grad: torch.Tensor, ref_loss: torch.Tensor, ref_grad: torch.Tensor, case: str
) -> None:
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=0.0, msg=lambda m: f"{case} loss: {m}")
    # Gradient entries are up to ~0.1; atol covers float32 cancellation near zero (q ~ p for
    # soft_ce, sign(q - p) / 2 ~ the coupling term for tv), where rtol alone cannot hold.
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-7, msg=lambda m: f"{case} grad: {m}")


# --------------------------------------------------------------------------------------------
# Vocabulary-parallel tests (gloo, one spawn per TP size, all cases inside the workers)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    loss_type: str
    vocab_size: int
    temperature: float
    chunk_size: int | None
    topk: int | None = None


# Per TP size the padded vocab is 8 * tp. Sizes below it put padding on the last rank(s); the
# starred ones leave a rank with only padding (tp=2: 7 -> rank 1; tp=3: 13 -> rank 2).
VOCAB_SIZES = {1: (8, 5), 2: (16, 11, 7), 3: (24, 13)}


# Both temperatures with a chunk size that does not divide S = 7, and the unchunked path.
TEMPERATURE_AND_CHUNK = ((0.7, 3), (1.0, 3), (1.0, None))


def tp_cases(tp: int) -> list[Case]:
    cases = []
    for vocab_size, (temperature, chunk_size) in itertools.product(VOCAB_SIZES[tp], TEMPERATURE_AND_CHUNK):
        for loss_type in ("soft_ce", "hard_ce", "tv"):
            cases.append(Case(loss_type, vocab_size, temperature, chunk_size))
        # k = 3 fits in one shard; k = 10 > V_local needs candidates from several ranks.
        for topk in (3, min(10, vocab_size)):
            cases.append(Case("topk_soft_ce", vocab_size, temperature, chunk_size, topk))
    return cases


def _tp_worker(rank: int, world_size: int, init_file: str) -> None:
    torch.set_num_threads(1)  # 2 cores shared by up to 3 workers
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
        timeout=timedelta(seconds=60),
    )
    try:
        group = dist.new_group(list(range(world_size)))
        columns = slice(rank * LOCAL_VOCAB, (rank + 1) * LOCAL_VOCAB)
        for index, case in enumerate(tp_cases(world_size)):
            _check_tp_case(index, case, group, world_size, columns)
        _check_bad_input_raises_on_every_rank(group, world_size)
    finally:
        dist.destroy_process_group()


def _check_tp_case(index: int, case: Case, group: dist.ProcessGroup, tp: int, columns: slice) -> None:
    student_full, teacher_full, mask, labels = make_inputs(index, 2, 7, LOCAL_VOCAB * tp, case.vocab_size)
    student = student_full[..., columns].clone().requires_grad_(True)
    loss = draft_loss(
        student, teacher_full[..., columns].clone(), mask, loss_type=case.loss_type, labels=labels,
        topk=case.topk, temperature=case.temperature, vocab_size=case.vocab_size, tp_group=group,
        chunk_size=case.chunk_size,
    )
    loss.backward()
    ref_loss, ref_grad = reference_loss_and_grad(
        student_full, teacher_full, mask, loss_type=case.loss_type, vocab_size=case.vocab_size,
        labels=labels, topk=case.topk, temperature=case.temperature,
    )
    assert_matches_reference(loss, student.grad, ref_loss, ref_grad[..., columns], f"tp={tp} {case}")


def _check_bad_input_raises_on_every_rank(group: dist.ProcessGroup, tp: int) -> None:
    """A ValueError on every rank before any collective: the next valid call must not deadlock."""
    student, teacher, mask, _ = make_inputs(0, 1, 4, LOCAL_VOCAB, LOCAL_VOCAB)
    with pytest.raises(ValueError, match="temperature"):
        draft_loss(student, teacher, mask, loss_type="soft_ce", temperature=0.0, tp_group=group)
    with pytest.raises(ValueError, match="topk"):
        draft_loss(student, teacher, mask, loss_type="topk_soft_ce", topk=LOCAL_VOCAB * tp + 1, tp_group=group)
    loss = draft_loss(student, teacher, mask, loss_type="soft_ce", tp_group=group)
    assert torch.isfinite(loss)


def run_workers(world_size: int, tmp_path: Path) -> None:
    """Spawn the TP workers; fail (not hang) on error or past the timeout; never leave one behind."""
    init_file = str(tmp_path / f"gloo_init_{world_size}")
    context = mp.start_processes(
        _tp_worker, args=(world_size, init_file), nprocs=world_size, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + WORKER_TIMEOUT_S
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"tp={world_size} workers did not finish within {WORKER_TIMEOUT_S}s (deadlock?)")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
            process.join(timeout=10)


@pytest.mark.parametrize("tp", [1, 2, 3])
def test_vocab_parallel_matches_float64_reference(tp: int, tmp_path: Path) -> None:
    run_workers(tp, tmp_path)


# --------------------------------------------------------------------------------------------
# Single-process behaviour
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_no_tp_group_matches_reference_float64(loss_type: str, temperature: float) -> None:
    student_full, teacher_full, mask, labels = make_inputs(1, 3, 11, 20, 17, dtype=torch.float64)
    student = student_full.clone().requires_grad_(True)
    loss = draft_loss(
        student, teacher_full, mask, loss_type=loss_type, labels=labels, topk=5,
        temperature=temperature, vocab_size=17, chunk_size=4,
    )
    loss.backward()
    ref_loss, ref_grad = reference_loss_and_grad(
        student_full, teacher_full, mask, loss_type=loss_type, vocab_size=17, labels=labels, topk=5,
        temperature=temperature,
    )
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0.0)
    torch.testing.assert_close(student.grad, ref_grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_draft_loss_from_hidden_eager_matches_reference_float64(loss_type: str) -> None:
    """The eager branch of draft_loss_from_hidden (what CPU runs): logits = hidden @ W^T over a
    padded weight, then draft_loss; loss and hidden-state gradient against float64."""
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(3, 11, 6, generator=gen, dtype=torch.float64)
    weight = torch.randn(20, 6, generator=gen, dtype=torch.float64)
    _, teacher_full, mask, labels = make_inputs(1, 3, 11, 20, 17, dtype=torch.float64)
    h = hidden.clone().requires_grad_(True)
    loss = draft_loss_from_hidden(h, weight, teacher_full, mask, loss_type=loss_type, labels=labels, topk=5,
                                  temperature=0.7, vocab_size=17, chunk_size=4, fused=False)
    loss.backward()
    ref_loss, ref_logit_grad = reference_loss_and_grad(
        hidden @ weight.t(), teacher_full, mask, loss_type=loss_type, vocab_size=17, labels=labels, topk=5,
        temperature=0.7)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0.0)
    torch.testing.assert_close(h.grad, ref_logit_grad @ weight, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_large_vocab_float32_accuracy(loss_type: str) -> None:
    """Float32 sums over a realistic vocabulary stay within rtol 3e-5 of the float64 reference.
    (soft_ce goes through torch's fused log_softmax, whose summation order and exp/log kernels follow
    the CPU: on an AMD EPYC build machine the loss was 1.02e-5 and one of 327,680 gradient entries
    1.27e-5 off in relative terms, under 1e-5 on the machines before.)"""
    student_full, teacher_full, mask, labels = make_inputs(11, 1, 5, 65536, 65000)
    student = student_full.clone().requires_grad_(True)
    loss = draft_loss(
        student, teacher_full, mask, loss_type=loss_type, labels=labels, topk=64, temperature=0.7,
        vocab_size=65000, chunk_size=2,
    )
    loss.backward()
    ref_loss, ref_grad = reference_loss_and_grad(
        student_full, teacher_full, mask, loss_type=loss_type, vocab_size=65000, labels=labels, topk=64,
        temperature=0.7,
    )
    torch.testing.assert_close(loss.double(), ref_loss, rtol=3e-5, atol=0.0)
    # |d loss / d student_v| <= q_v * weight / T, so weight / T is the natural gradient scale.
    # Near-disjoint p and q make tv's q_v * (1/2 - coupling) cancel, leaving the float32
    # rounding of student / T (~1e-6 relative at |z| ~ 20) visible at that scale.
    grad_scale = 1.0 / (mask.sum().item() * 0.7)
    torch.testing.assert_close(student.grad.double(), ref_grad, rtol=3e-5, atol=1e-6 * grad_scale)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_bfloat16_inputs_compute_in_float32(loss_type: str) -> None:
    student_full, teacher_full, mask, labels = make_inputs(2, 2, 9, 16, 16, dtype=torch.bfloat16)
    student = student_full.clone().requires_grad_(True)
    loss = draft_loss(student, teacher_full, mask, loss_type=loss_type, labels=labels, topk=4, chunk_size=2)
    loss.backward()
    # The reference sees exactly the bf16 values the loss saw.
    ref_loss, ref_grad = reference_loss_and_grad(
        student_full, teacher_full, mask, loss_type=loss_type, vocab_size=16, labels=labels, topk=4
    )
    assert loss.dtype == torch.float32 and student.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=0.0)
    torch.testing.assert_close(student.grad.double(), ref_grad, rtol=1e-2, atol=1e-5)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_teacher_gets_no_gradient(loss_type: str) -> None:
    student_full, teacher_full, mask, labels = make_inputs(3, 2, 6, 8, 8)
    student = student_full.clone().requires_grad_(True)
    teacher = teacher_full.clone().requires_grad_(True)
    draft_loss(student, teacher, mask, loss_type=loss_type, labels=labels, topk=3).backward()
    assert teacher.grad is None
    assert student.grad is not None


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_chunked_equals_unchunked(loss_type: str) -> None:
    student_full, teacher_full, mask, labels = make_inputs(4, 2, 13, 24, 21)

    def loss_and_grad(chunk_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        student = student_full.clone().requires_grad_(True)
        loss = draft_loss(
            student, teacher_full, mask, loss_type=loss_type, labels=labels, topk=6, temperature=0.7,
            vocab_size=21, chunk_size=chunk_size,
        )
        loss.backward()
        return loss.detach(), student.grad

    whole_loss, whole_grad = loss_and_grad(None)
    for chunk_size in (1, 3, 5, 13, 100):
        loss, grad = loss_and_grad(chunk_size)
        torch.testing.assert_close(loss, whole_loss, rtol=1e-6, atol=0.0)
        torch.testing.assert_close(grad, whole_grad, rtol=1e-6, atol=1e-9)


def test_topk_over_whole_vocab_equals_soft_ce() -> None:
    student, teacher, mask, _ = make_inputs(5, 2, 5, 8, 8)
    full = draft_loss(student, teacher, mask, loss_type="soft_ce", temperature=0.7)
    topk = draft_loss(student, teacher, mask, loss_type="topk_soft_ce", topk=8, temperature=0.7)
    torch.testing.assert_close(topk, full, rtol=1e-6, atol=0.0)


def test_hard_ce_ignores_labels_at_masked_positions() -> None:
    student, teacher, mask, labels = make_inputs(6, 2, 7, 8, 8)
    other = labels.clone()
    other[mask == 0] = 3
    with_ignore = draft_loss(student, None, mask, loss_type="hard_ce", labels=labels)
    with_valid = draft_loss(student, teacher, mask, loss_type="hard_ce", labels=other)
    torch.testing.assert_close(with_ignore, with_valid, rtol=0.0, atol=0.0)


# --------------------------------------------------------------------------------------------
# Memory behaviour
# --------------------------------------------------------------------------------------------


def naive_soft_ce(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    per_position = -(torch.softmax(teacher, -1) * torch.log_softmax(student, -1)).sum(-1)
    return (per_position * mask).sum() / mask.sum()


def saved_tensor_sizes(fn) -> list[tuple[int, int]]:
    """(numel, data_ptr) of every tensor autograd saves while `fn` builds its graph."""
    saved: list[tuple[int, int]] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append((tensor.numel(), tensor.data_ptr()))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return saved


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_graph_saves_no_full_size_intermediates(loss_type: str) -> None:
    batch, length, vocab, topk = 2, 64, 256, 8
    student_full, teacher, mask, labels = make_inputs(7, batch, length, vocab, vocab)
    student = student_full.clone().requires_grad_(True)
    saved = saved_tensor_sizes(
        lambda: draft_loss(student, teacher, mask, loss_type=loss_type, labels=labels, topk=topk, chunk_size=8)
    )
    inputs = {student.data_ptr(), teacher.data_ptr()}
    extra = [numel for numel, ptr in saved if ptr not in inputs]
    # Only per-position statistics: at most a few [B, S, topk] tensors beyond the inputs.
    assert sum(extra) <= 4 * batch * length * (topk + 1), extra
    # The hook does see full-size intermediates where a plain autograd graph keeps them.
    naive = saved_tensor_sizes(lambda: naive_soft_ce(student, teacher, mask))
    assert sum(numel for numel, ptr in naive if ptr not in inputs) >= 2 * batch * length * vocab


def peak_allocated_bytes(fn) -> int:
    """Peak of (CPU allocator bytes allocated - freed) while `fn` runs, from profiler events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return peak


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_peak_memory_is_bounded_by_one_chunk(loss_type: str) -> None:
    batch, length, vocab, chunk_size = 1, 512, 2048, 16
    student_full, teacher, mask, labels = make_inputs(8, batch, length, vocab, vocab)
    full_bytes = batch * length * vocab * 4
    chunk_bytes = batch * chunk_size * vocab * 4

    def run(chunk: int | None) -> int:
        student = student_full.clone().requires_grad_(True)
        return peak_allocated_bytes(
            lambda: draft_loss(
                student, teacher, mask, loss_type=loss_type, labels=labels, topk=8, temperature=0.7,
                chunk_size=chunk,
            ).backward()
        )

    chunked = run(chunk_size)
    # The gradient itself (one full-size tensor) plus a few chunk-sized temporaries.
    assert chunked <= full_bytes + 8 * chunk_bytes, (chunked, full_bytes, chunk_bytes)
    # Sanity check of the measurement: without chunking the temporaries are full-size.
    assert run(None) >= 2 * full_bytes


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def _good_args() -> dict:
    student, teacher, mask, labels = make_inputs(9, 2, 5, 8, 8)
    return dict(student_logits=student, teacher_logits=teacher, mask=mask, labels=labels, loss_type="soft_ce")


def _call(**overrides) -> torch.Tensor:
    args = _good_args()
    args.update(overrides)
    return draft_loss(args.pop("student_logits"), args.pop("teacher_logits"), args.pop("mask"), **args)


@pytest.mark.parametrize(
    "overrides, argument",
    [
        (dict(loss_type="kl"), "loss_type"),
        (dict(loss_type="hard_ce", labels=None), "labels"),
        (dict(loss_type="topk_soft_ce"), "topk"),
        (dict(loss_type="topk_soft_ce", topk=0), "topk"),
        (dict(loss_type="topk_soft_ce", topk=9), "topk"),
        (dict(loss_type="topk_soft_ce", topk=6, vocab_size=5), "topk"),
        (dict(loss_type="topk_soft_ce", topk=2.0), "topk"),
        (dict(teacher_logits=torch.randn(2, 5, 7)), "teacher_logits"),
        (dict(teacher_logits=torch.randn(2, 5, 8, dtype=torch.float64)), "teacher_logits"),
        (dict(teacher_logits=None), "teacher_logits"),
        (dict(student_logits=torch.randn(2, 5)), "student_logits"),
        (dict(student_logits=torch.ones(2, 5, 8, dtype=torch.long)), "student_logits"),
        (dict(mask=torch.ones(2, 4)), "mask"),
        (dict(mask=torch.ones(10)), "mask"),
        (dict(mask=torch.zeros(2, 5)), "mask"),
        (dict(loss_type="hard_ce", labels=torch.zeros(2, 4, dtype=torch.long)), "labels"),
        (dict(loss_type="hard_ce", labels=torch.zeros(2, 5)), "labels"),
        (dict(loss_type="hard_ce", labels=torch.full((2, 5), 8)), "labels"),
        (dict(loss_type="hard_ce", labels=torch.full((2, 5), -1)), "labels"),
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(vocab_size=9), "vocab_size"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(chunk_size=0), "chunk_size"),
    ],
)
def test_bad_input_raises_value_error(overrides: dict, argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        _call(**overrides)


# --------------------------------------------------------------------------------------------
# shift_mask
# --------------------------------------------------------------------------------------------


def loop_shift_mask_packed(mask: torch.Tensor, shift: int, cu_seqlens: list[int]) -> torch.Tensor:
    out = torch.zeros_like(mask)
    for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        for t in range(start, end):
            if t + shift < end:
                out[t] = mask[t] and mask[t + shift]
    return out


def loop_shift_mask_rows(mask: torch.Tensor, shift: int) -> torch.Tensor:
    out = torch.zeros_like(mask)
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1] - shift):
            out[b, t] = mask[b, t] * mask[b, t + shift]
    return out


def random_cu_seqlens(gen: torch.Generator, segments: int) -> list[int]:
    lengths = torch.randint(0, 7, (segments,), generator=gen)  # includes empty segments
    return [0] + torch.cumsum(lengths, 0).tolist()


@pytest.mark.parametrize("shift", [0, 1, 2, 3])
def test_shift_mask_packed_matches_loop(shift: int) -> None:
    gen = torch.Generator().manual_seed(shift)
    for trial in range(20):
        cu_seqlens = random_cu_seqlens(gen, segments=1 + trial % 6)
        total = cu_seqlens[-1]
        mask = torch.rand(total, generator=gen) > 0.2
        expected = loop_shift_mask_packed(mask, shift, cu_seqlens)
        cu = torch.tensor(cu_seqlens, dtype=torch.int32 if trial % 2 else torch.int64)
        assert torch.equal(shift_mask(mask, shift, cu), expected), (cu_seqlens, shift)
        assert torch.equal(shift_mask(mask[None], shift, cu), expected[None])


@pytest.mark.parametrize("shift", [1, 2, 3])
def test_shift_mask_unpacked_matches_loop(shift: int) -> None:
    gen = torch.Generator().manual_seed(10 + shift)
    for length in (1, 2, 5, 9):
        mask = (torch.rand(3, length, generator=gen) > 0.3).float()
        out = shift_mask(mask, shift)
        assert out.dtype == mask.dtype
        assert torch.equal(out, loop_shift_mask_rows(mask, shift))
        assert torch.equal(shift_mask(mask.bool(), shift), loop_shift_mask_rows(mask, shift).bool())


@pytest.mark.parametrize(
    "mask, shift, cu_seqlens, argument",
    [
        (torch.ones(2, 5), -1, None, "shift"),
        (torch.ones(2, 5), 1.0, None, "shift"),
        (torch.ones(2, 3, 4), 1, None, "mask"),
        (torch.ones(10), 1, None, "mask"),
        (torch.ones(2, 5), 1, torch.tensor([0, 5, 10]), "mask"),
        (torch.ones(10), 1, torch.tensor([1, 10]), "cu_seqlens"),
        (torch.ones(10), 1, torch.tensor([0, 9]), "cu_seqlens"),
        (torch.ones(10), 1, torch.tensor([0, 6, 4, 10]), "cu_seqlens"),
        (torch.ones(10), 1, torch.tensor([0.0, 10.0]), "cu_seqlens"),
        (torch.ones(10), 1, torch.tensor([[0, 10]]), "cu_seqlens"),
    ],
)
def test_shift_mask_bad_input(mask: torch.Tensor, shift, cu_seqlens, argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        shift_mask(mask, shift, cu_seqlens)


def test_acceptance_probability_is_one_minus_tv_in_float64():
    """1 - TV(softmax(teacher / T), softmax(student / T)) per position, padded columns excluded."""
    from skyrl_mtp.mtp.losses import acceptance_probability

    generator = torch.Generator().manual_seed(5)
    vocab, padded = 37, 40
    student = torch.randn(3, 7, padded, generator=generator)
    teacher = torch.randn(3, 7, padded, generator=generator) * 2
    student[..., vocab:] = 50.0  # padding: must not count
    teacher[..., vocab:] = -50.0
    got = acceptance_probability(student, teacher, temperature=0.7, vocab_size=vocab, chunk_size=3)
    p = torch.softmax(teacher[..., :vocab].double() / 0.7, -1)
    q = torch.softmax(student[..., :vocab].double() / 0.7, -1)
    expected = 1.0 - 0.5 * (p - q).abs().sum(-1)
    assert got.shape == (3, 7) and not got.requires_grad
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-6)
    assert acceptance_probability(teacher, teacher, vocab_size=vocab).sub(1).abs().max() < 1e-6
