"""CUDA-IPC weight transport: packing (CPU) and a real two-process transfer (GPU only).

The GPU test runs the sender (``IpcWeightSender``, as in the policy actor) in a spawned process
and receives with ``open_bucket`` (as in the vLLM worker) here; the reference is the same seeded
tensors rebuilt in this process. It skips without CUDA (CI); docs/gpu.md says how it was run.
"""

from __future__ import annotations

import multiprocessing as mp

import pytest
import torch

from skyrl_mtp.inference.transports.buckets import (
    ALIGN,
    PieceSpec,
    StagedWeights,
    iter_buckets,
    pack_bucket,
    packed_size,
    unpack_bucket,
)
from skyrl_mtp.inference.transports.cuda_ipc import IpcWeightSender, local_device_of


def _weights(device="cpu") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {
        "model.embed_tokens.weight": torch.randn(300, 16, generator=g).to(torch.bfloat16),  # 9600 B: split
        "model.norm.weight": torch.randn(16, generator=g),
        "model.layers.0.self_attn.q_proj.bias": torch.randn(5, generator=g).to(torch.float16),  # odd size
        "lm_head.weight": torch.randn(300, 16, generator=g).t().contiguous().t(),  # non-contiguous view
        "model.layers.0.mlp.up_proj.weight": torch.randn(7, 3, generator=g, dtype=torch.float64),
    } if device == "cpu" else {k: v.to(device) for k, v in _weights().items()}


def _reassembled(buckets_of_pieces) -> dict[str, torch.Tensor]:
    staged = StagedWeights(version=1)
    for pieces in buckets_of_pieces:
        staged.add(pieces)
    return dict(staged.tensors())


def test_pack_unpack_round_trip_through_buckets():
    weights = _weights()
    received = []
    for pieces in iter_buckets(weights, 4096, to_wire=torch.Tensor.detach):
        buffer = torch.full((packed_size(pieces) + 64,), 0xAB, dtype=torch.uint8)
        specs = pack_bucket(pieces, buffer)
        assert all(s.offset % ALIGN == 0 for s in specs)
        out = unpack_bucket(buffer, specs)
        buffer.fill_(0)  # unpacked pieces are copies: reusing the buffer must not change them
        received.append(out)
    got = _reassembled(received)
    assert set(got) == set(weights)
    for name, tensor in weights.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
    assert len(received) > 2  # the bound split the set (and the embedding's rows)


def test_pack_and_unpack_refuse_bad_buffers():
    pieces = next(iter_buckets(_weights(), 1 << 20, to_wire=torch.Tensor.detach))
    with pytest.raises(ValueError, match="buffer of 10 bytes"):
        pack_bucket(pieces, torch.empty(10, dtype=torch.uint8))
    with pytest.raises(ValueError, match="flat uint8 buffer"):
        pack_bucket(pieces, torch.empty(1 << 20, dtype=torch.float32))
    spec = PieceSpec("w", torch.float32, (100,), 0, 0, (100,))
    with pytest.raises(ValueError, match="outside the 64-byte bucket"):
        unpack_bucket(torch.empty(64, dtype=torch.uint8), [spec])


def test_sender_needs_cuda_tensors_and_receiver_names_the_fix():
    with pytest.raises(ValueError, match="needs every tensor on one CUDA device"):
        IpcWeightSender(_weights(), 1 << 20)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="weight_transport=ray"):
            local_device_of("GPU-00000000-0000-0000-0000-000000000000")


# ----------------------------------------------------------------------------- GPU: two processes

def _sender(queue, acks, bucket_bytes):
    sender = IpcWeightSender(_weights("cuda"), bucket_bytes)
    queue.put(sender.num_buckets)
    for i in range(sender.num_buckets):
        queue.put(sender.bucket(i))
        acks.get(timeout=120)  # the receiver has copied bucket i: the buffer may be overwritten
    sender.close()
    queue.put("done")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA IPC needs a GPU")
def test_transfer_between_processes_equals_the_sent_tensors():
    from skyrl_mtp.inference.transports.cuda_ipc import open_bucket

    ctx = mp.get_context("spawn")
    queue, acks = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_sender, args=(queue, acks, 4096))
    proc.start()
    try:
        received = []
        for _ in range(queue.get(timeout=300)):
            pieces = open_bucket(queue.get(timeout=120))
            assert all(p.tensor.is_cuda for p in pieces)
            received.append(pieces)
            acks.put(True)
        assert queue.get(timeout=120) == "done"
    finally:
        proc.join(timeout=60)
    assert proc.exitcode == 0
    got = _reassembled(received)
    expected = _weights()
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name].cpu(), tensor), name
