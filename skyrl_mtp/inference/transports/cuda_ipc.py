"""``cuda_ipc``: GPU-to-GPU weight sync for engines that share a GPU with the policy (colocated).

Owns:
- ``IpcWeightSender`` (policy side): plans the buckets of one sync over GPU tensors (no copies),
  packs one bucket at a time into a reused buffer and exports it as an ``IpcBucket`` (the CUDA IPC
  handle of the buffer, keyed by the GPU's UUID, plus the specs).
- ``open_bucket`` (engine side): maps the buffer and *copies* each piece out (device-to-device),
  so the sender may overwrite its buffer as soon as the call returns.
- ``CudaIpcTransport`` (driver side): the ``WeightTransport`` that drives it; only handles and
  metadata go through Ray, the bytes never leave the GPU.

The bucket is packed into one flat buffer (``buckets.pack_bucket``). The engine stages the copies
exactly as the Ray transport stages host tensors (``StagedWeights``) and applies them with the same
in-place reload of target and drafter (vLLM 0.25 and 0.3x, ``inference/worker_extension.py``), so
the transports share the two-phase push (``base.py``) and its failure rules.
Cost: one extra copy of the weights on the engine's GPU while a sync is open.

``reduce_tensor`` / ``rebuild_cuda_tensor`` are torch's own CUDA IPC (what torch.multiprocessing
uses). Its handle names the sender's *local* device index; the receiver may number the GPUs
differently (Ray sets CUDA_VISIBLE_DEVICES per actor), hence the UUID.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import torch

from skyrl_mtp.inference.transports.base import WeightSyncStats, WeightTransport
from skyrl_mtp.inference.transports.buckets import (
    NamedTensors,
    PieceSpec,
    TensorPiece,
    iter_buckets,
    pack_bucket,
    packed_size,
    unpack_bucket,
)

_DEVICE_INDEX_ARG = 6  # position of the device index in reduce_tensor's rebuild arguments


@dataclass(frozen=True)
class IpcBucket:
    """One packed bucket as it travels through Ray: no tensor data, only the IPC handle."""

    gpu_uuid: str
    rebuild_args: tuple
    nbytes: int
    specs: tuple[PieceSpec, ...]


def gpu_uuid(device: torch.device) -> str:
    return str(torch.cuda.get_device_properties(device).uuid)


def local_device_of(uuid: str) -> int:
    """This process's index of the GPU with ``uuid``; a clear error when it is not visible here."""
    visible = {str(torch.cuda.get_device_properties(i).uuid): i for i in range(torch.cuda.device_count())}
    if uuid not in visible:
        raise RuntimeError(
            f"cuda_ipc weight sync: the policy's GPU {uuid} is not visible to this engine (it sees "
            f"{sorted(visible) or 'no GPU'}). CUDA IPC needs the engine on the policy's GPU: colocate them "
            "(generator.num_gpus_per_engine and megatron.num_gpus_per_worker fractions of one GPU) or set "
            "generator.weight_transport=ray")
    return visible[uuid]


def open_bucket(bucket: IpcBucket) -> list[TensorPiece]:
    """Engine side: maps the sender's buffer and returns private device copies of its pieces."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    args = list(bucket.rebuild_args)
    args[_DEVICE_INDEX_ARG] = local_device_of(bucket.gpu_uuid)
    buffer = rebuild_cuda_tensor(*args)
    if buffer.numel() < bucket.nbytes:
        raise RuntimeError(f"cuda_ipc weight sync: mapped buffer has {buffer.numel()} bytes, expected {bucket.nbytes}")
    pieces = unpack_bucket(buffer, bucket.specs)
    # The copies must be complete before the sender is told it may overwrite the buffer.
    torch.cuda.synchronize(buffer.device)
    del buffer
    return pieces


class IpcWeightSender:
    """Policy side of one sync: the bucket plan over the exported GPU tensors, and one reused
    packing buffer. ``bucket(i)`` overwrites the buffer, so the caller must wait until every
    engine has returned from bucket ``i - 1`` (the transport does)."""

    def __init__(self, named_tensors: NamedTensors, bucket_bytes: int):
        self.buckets = list(iter_buckets(named_tensors, bucket_bytes, to_wire=torch.Tensor.detach))
        devices = {p.tensor.device for b in self.buckets for p in b}
        if any(d.type != "cuda" for d in devices) or len(devices) > 1:
            raise ValueError(f"cuda_ipc weight sync needs every tensor on one CUDA device, got {sorted(map(str, devices))}")
        self.device = devices.pop() if devices else None
        size = max((packed_size(b) for b in self.buckets), default=0)
        self.buffer = torch.empty(size, dtype=torch.uint8, device=self.device) if self.buckets else None

    @property
    def num_buckets(self) -> int:
        return len(self.buckets)

    def bucket(self, index: int) -> IpcBucket:
        from torch.multiprocessing.reductions import reduce_tensor

        pieces = self.buckets[index]
        specs = pack_bucket(pieces, self.buffer)
        torch.cuda.synchronize(self.device)  # the engine reads the buffer from another process
        _, args = reduce_tensor(self.buffer)
        return IpcBucket(gpu_uuid(self.device), tuple(args), packed_size(pieces), specs)

    def close(self) -> None:
        self.buckets, self.buffer = [], None


class IpcWeightSource(Protocol):
    """What ``CudaIpcTransport`` pushes from: the policy's rank that holds the full weights
    (``skyrl_mtp.workers.actors.WorkerGroup`` implements it)."""

    def open_ipc_weights(self, version: int, bucket_bytes: int) -> int: ...

    def ipc_weight_bucket(self, index: int) -> IpcBucket: ...

    def close_ipc_weights(self) -> None: ...


class CudaIpcTransport(WeightTransport):
    """GPU transport for colocated engines: per bucket, the policy packs and exports a CUDA IPC
    handle, and every engine copies the bucket out of the policy's GPU memory into its staging
    set; then the same prepare/finish phases as the Ray transport (``WeightTransport.push``)."""

    name = "cuda_ipc"

    def deliver(self, engines: Sequence[Any], source: Any, version: int, stats: WeightSyncStats) -> None:
        from skyrl_mtp.inference.remote import gather

        if not all(hasattr(source, m) for m in ("open_ipc_weights", "ipc_weight_bucket", "close_ipc_weights")):
            raise TypeError(f"the cuda_ipc transport pushes from the policy workers (an IpcWeightSource), got "
                            f"{type(source).__name__}; tensors in the trainer process go with weight_transport=ray")
        try:
            for index in range(source.open_ipc_weights(version, self.bucket_bytes)):
                bucket = source.ipc_weight_bucket(index)
                gather([(e, e.actor.receive_ipc_bucket.remote(version, index, bucket)) for e in engines],
                       f"cuda_ipc weight bucket {index} of version {version}", self.timeout_s)
                stats.add_bucket(num_whole=sum(1 for s in bucket.specs if s.row_start == 0),
                                 nbytes=sum(s.nbytes for s in bucket.specs))
        finally:
            source.close_ipc_weights()  # the engines hold copies; the policy's buffer can go
