"""``broadcast``: the policy broadcasts bucketed HF-named tensors to every engine over a
torch.distributed group (gloo on CPU, NCCL on GPUs), for engines on other GPUs and nodes.

The group is a standalone process group (``ProcessGroupGloo`` / ``ProcessGroupNCCL`` built on a
``TCPStore``), never torch.distributed's default group: the policy rank already has Megatron's,
and each vLLM worker has vLLM's. Members:

    rank 0             the sender: the policy's rank that holds the full weights (TP 0 of DP 0,
                       ``WorkerGroup`` implements ``BroadcastWeightSource``), or the calling process
                       when ``push`` is given host tensors (the driver's copies)
    ranks 1, 2, ...    every vLLM worker of every engine: engine e's worker w gets
                       1 + (workers of engines before e) + w, so an engine with vLLM TP = t has t
                       members, and each TP worker receives the full tensors and takes its own shard
                       in the in-place reload (vLLM's ``load_weights`` shards checkpoint tensors)

The sender's TCPStore takes a free port (port 0); members meet on loopback when the Ray cluster
has one node, else on their nodes' IPs. The backend follows the sender: NCCL when its weights are on a GPU (the
engines must then be CUDA engines on *other* GPUs: two members on one GPU is what ``cuda_ipc`` is
for), else gloo, with host buffers on both ends.

One sync, inside the shared two-phase push (``base.WeightTransport.push``):

    open_broadcast_weights(version)   the sender exports the weights and plans the buckets
                                      (``PieceSpec``s only: names, dtypes, shapes, offsets)
    check_weight_plan(version, plan)  every engine checks the *whole* plan (checkpoint names,
                                      shapes, float dtypes, no tensor missing) before a byte moves
    per bucket i:                     every engine's ``receive_broadcast_bucket(version, i, specs)``
                                      is in flight, then the sender packs bucket i into one flat
                                      buffer and broadcasts it; each worker receives into its own
                                      buffer, copies the pieces out and stages them
    prepare / finish                  as for every transport (target and drafter reloaded in place)

A broadcast is a collective: every member must take part or the others wait. So a worker always
receives a bucket before its engine decides whether to stage it (a refused bucket is received,
dropped, and aborts the sync), refusals that can be known early happen at the plan check, and
every operation has a timeout (the process group's, ``timeout_s``, default 600 s). After any
failure during delivery the group is taken down on every member and formed again at the next
push: a collective that failed half-way leaves its communicator unusable.
"""

from __future__ import annotations

import datetime
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
    piece_specs,
    specs_size,
    unpack_bucket,
)

BACKENDS = ("gloo", "nccl")
DEFAULT_TIMEOUT_S = 600.0
_STORE_PREFIX = "skyrl_mtp/weight_broadcast"


def single_node() -> bool:
    """True when every member can be on this machine: no Ray, or a Ray cluster of one live node."""
    try:
        import ray
    except ImportError:
        return True
    if not ray.is_initialized():
        return True
    return sum(1 for n in ray.nodes() if n.get("Alive")) <= 1


def member_address(loopback: bool) -> str:
    """The address this process listens on for the group: loopback when every member is on one
    machine, else this Ray node's IP."""
    if loopback:
        return "127.0.0.1"
    import ray

    return ray.util.get_node_ip_address()


class BroadcastGroup:
    """This process's membership in one weight-broadcast group."""

    def __init__(self, rendezvous: dict[str, Any], rank: int, store: Any = None):
        import torch.distributed as dist

        backend, world_size = rendezvous["backend"], rendezvous["world_size"]
        if backend not in BACKENDS:
            raise ValueError(f"weight broadcast: backend must be one of {BACKENDS}, got {backend!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"weight broadcast: rank {rank} outside the group of {world_size}")
        if backend == "nccl" and not torch.cuda.is_available():
            raise RuntimeError("weight broadcast over NCCL needs a CUDA device in every member; this process has "
                               "none (CPU engines take the broadcast over gloo, from a sender on the CPU)")
        timeout = datetime.timedelta(seconds=rendezvous["timeout_s"])
        if store is None:
            store = dist.TCPStore(rendezvous["host"], rendezvous["port"], world_size, is_master=False,
                                  timeout=timeout)
        prefixed = dist.PrefixStore(f"{_STORE_PREFIX}/{rendezvous['group_id']}", store)
        if backend == "gloo":
            options = dist.ProcessGroupGloo._Options()
            options._timeout = timeout
            options._devices = [dist.ProcessGroupGloo.create_device(hostname=member_address(rendezvous["loopback"]))]
            self.pg = dist.ProcessGroupGloo(prefixed, rank, world_size, options)
            self.device = torch.device("cpu")
        else:
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self.pg = dist.ProcessGroupNCCL(prefixed, rank, world_size, options)
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._store = store  # the sender's store serves the rendezvous: keep it alive with the group
        self.rank, self.world_size, self.backend = rank, world_size, backend
        self.group_id = rendezvous["group_id"]
        self._buffer: torch.Tensor | None = None

    def buffer(self, nbytes: int) -> torch.Tensor:
        """A flat uint8 buffer of at least ``nbytes`` on the group's device, reused across buckets."""
        if self._buffer is None or self._buffer.numel() < nbytes:
            self._buffer = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        return self._buffer[:nbytes]

    def broadcast(self, buffer: torch.Tensor) -> None:
        import torch.distributed as dist

        options = dist.BroadcastOptions()
        options.rootRank = 0
        self.pg.broadcast([buffer], options).wait()
        if buffer.is_cuda:
            torch.cuda.synchronize(buffer.device)

    def free_buffer(self) -> None:
        self._buffer = None

    def close(self) -> None:
        pg, self.pg, self._buffer, self._store = self.pg, None, None, None
        shutdown = getattr(pg, "shutdown", None) if pg is not None else None
        if shutdown is not None:
            try:
                shutdown()
            except Exception:  # noqa: BLE001 - leaving a broken group must not raise over the real error
                pass


def receive_bucket(group: BroadcastGroup, specs: Sequence[PieceSpec]) -> list[TensorPiece]:
    """Engine side (in each vLLM worker): takes part in one bucket's broadcast and returns private
    copies of its pieces (the receive buffer is reused for the next bucket)."""
    buffer = group.buffer(specs_size(specs))
    group.broadcast(buffer)
    return unpack_bucket(buffer, specs)


class BroadcastWeightSender:
    """Rank 0 of a weight-broadcast group, in whichever process holds the weights (the policy's
    rank, or the driver for host tensors): ``listen`` (a TCPStore on a free port) -> ``join``
    (collective with every engine worker) -> per sync ``open`` (plan) and ``send(i)`` per bucket."""

    def __init__(self) -> None:
        self.group: BroadcastGroup | None = None
        self._rendezvous: dict[str, Any] | None = None
        self._store: Any = None
        self._buckets: list[list[TensorPiece]] = []

    def listen(self, world_size: int, backend: str, timeout_s: float, group_id: str) -> dict[str, Any]:
        import torch.distributed as dist

        self.leave()
        loopback = single_node()
        host = member_address(loopback)
        # Port 0: the OS picks a free port, which the rendezvous then names.
        self._store = dist.TCPStore(host, 0, world_size, is_master=True, wait_for_workers=False,
                                    timeout=datetime.timedelta(seconds=timeout_s))
        self._rendezvous = {"host": host, "port": int(self._store.port), "world_size": world_size,
                            "backend": backend, "timeout_s": float(timeout_s), "group_id": group_id,
                            "loopback": loopback}
        return dict(self._rendezvous)

    def join(self) -> None:
        if self._rendezvous is None:
            raise RuntimeError("weight broadcast: join before listen")
        self.group = BroadcastGroup(self._rendezvous, 0, store=self._store)

    def open(self, named_tensors: NamedTensors, bucket_bytes: int) -> list[tuple[PieceSpec, ...]]:
        """Plans one sync's buckets over the tensors where they are (no copies) and returns their
        specs, the metadata the engines check before any byte moves."""
        if self.group is None:
            raise RuntimeError("weight broadcast: the sender has not joined a group")
        self._buckets = list(iter_buckets(named_tensors, bucket_bytes, to_wire=torch.Tensor.detach))
        return [piece_specs(b) for b in self._buckets]

    def send(self, index: int) -> int:
        """Packs bucket ``index`` into the group's buffer and broadcasts it; returns its bytes."""
        pieces = self._buckets[index]
        buffer = self.group.buffer(packed_size(pieces))
        pack_bucket(pieces, buffer)
        self.group.broadcast(buffer)
        return sum(p.nbytes for p in pieces)

    def close_weights(self) -> None:
        self._buckets = []
        if self.group is not None:
            self.group.free_buffer()

    def leave(self) -> None:
        self.close_weights()
        group, self.group, self._store, self._rendezvous = self.group, None, None, None
        if group is not None:
            group.close()


class BroadcastWeightSource(Protocol):
    """What ``BroadcastTransport`` pushes from: the policy's rank that holds the full weights
    (``skyrl_mtp.workers.actors.WorkerGroup``). ``join_weight_broadcast`` and
    ``broadcast_weight_bucket`` block until every member has taken part."""

    def weight_broadcast_backend(self) -> str: ...

    def listen_weight_broadcast(self, world_size: int, backend: str, timeout_s: float,
                                group_id: str) -> dict[str, Any]: ...

    def join_weight_broadcast(self) -> None: ...

    def open_broadcast_weights(self, version: int, bucket_bytes: int) -> list[tuple[PieceSpec, ...]]: ...

    def broadcast_weight_bucket(self, index: int) -> int: ...

    def close_broadcast_weights(self) -> None: ...

    def leave_weight_broadcast(self) -> None: ...


_SOURCE_METHODS = ("weight_broadcast_backend", "listen_weight_broadcast", "join_weight_broadcast",
                   "open_broadcast_weights", "broadcast_weight_bucket", "close_broadcast_weights",
                   "leave_weight_broadcast")


class HostTensorSource:
    """The calling process as rank 0, sending host tensors it holds (e.g. the driver's copies of
    the policy's weights, or a test's). Gloo: the tensors never leave the host, the engines
    receive them over gloo into host buffers."""

    def __init__(self) -> None:
        self.sender = BroadcastWeightSender()
        self.tensors: NamedTensors | None = None

    def weight_broadcast_backend(self) -> str:
        return "gloo"

    def listen_weight_broadcast(self, world_size: int, backend: str, timeout_s: float, group_id: str) -> dict[str, Any]:
        return self.sender.listen(world_size, backend, timeout_s, group_id)

    def join_weight_broadcast(self) -> None:
        self.sender.join()

    def open_broadcast_weights(self, version: int, bucket_bytes: int) -> list[tuple[PieceSpec, ...]]:
        if self.tensors is None:
            raise RuntimeError("weight broadcast: no host tensors to send")
        return self.sender.open(self.tensors, bucket_bytes)

    def broadcast_weight_bucket(self, index: int) -> int:
        return self.sender.send(index)

    def close_broadcast_weights(self) -> None:
        self.tensors = None
        self.sender.close_weights()

    def leave_weight_broadcast(self) -> None:
        self.sender.leave()


class BroadcastTransport(WeightTransport):
    """Engines on other GPUs or nodes: the policy's rank 0 broadcasts each packed bucket to every
    engine worker over one process group (see the module docstring); the shared prepare / finish
    phases apply it. ``push`` takes the policy workers (a ``BroadcastWeightSource``) or host tensors
    (sent from this process)."""

    name = "broadcast"

    def __init__(self, bucket_bytes: int, timeout_s: float | None = None):
        super().__init__(bucket_bytes, timeout_s)
        self._host_source = HostTensorSource()
        self._source: Any = None  # the sender of the group in place
        self._joining: Any = None  # the sender of a group being formed
        self._members: tuple[int, ...] | None = None
        self._engines: list[Any] = []
        self._groups_formed = 0

    @property
    def collective_timeout_s(self) -> float:
        return float(self.timeout_s) if self.timeout_s else DEFAULT_TIMEOUT_S

    def deliver(self, engines: Sequence[Any], source: Any, version: int, stats: WeightSyncStats) -> None:
        from skyrl_mtp.inference.remote import gather

        if all(hasattr(source, m) for m in _SOURCE_METHODS):
            sender = source
        elif hasattr(source, "__iter__"):  # host tensors (a mapping or (name, tensor) pairs)
            sender = self._host_source
            sender.tensors = source
        else:
            raise TypeError(f"the broadcast transport pushes from the policy workers (a BroadcastWeightSource) "
                            f"or from host tensors, got {type(source).__name__}")
        collective = False
        try:
            self._ensure_group(engines, sender)
            plan = sender.open_broadcast_weights(version, self.bucket_bytes)
            # Every refusal that can be known from the metadata happens here, before any collective.
            gather([(e, e.actor.check_weight_plan.remote(version, plan)) for e in engines],
                   f"check_weight_plan(version={version})", self.timeout_s)
            for index, specs in enumerate(plan):
                calls = [(e, e.actor.receive_broadcast_bucket.remote(version, index, specs)) for e in engines]
                collective = True
                sender.broadcast_weight_bucket(index)  # returns once every member has the bucket
                gather(calls, f"broadcast weight bucket {index} of version {version}", self.timeout_s)
                stats.add_bucket(num_whole=sum(1 for s in specs if s.row_start == 0),
                                 nbytes=sum(s.nbytes for s in specs))
        except BaseException:
            if collective or self._source is None:
                self._leave_group()  # a collective that failed half-way leaves the communicator unusable
            raise
        finally:
            sender.close_broadcast_weights()

    def _ensure_group(self, engines: Sequence[Any], sender: Any) -> None:
        """Forms the group (sender + every engine worker) unless the one in place has exactly these
        members."""
        import ray

        from skyrl_mtp.inference.remote import gather

        members = tuple(e.index for e in engines)
        if self._source is sender and self._members == members:
            return
        self._leave_group()
        workers = gather([(e, e.actor.num_workers.remote()) for e in engines], "num_workers", self.timeout_s)
        first_ranks, rank = [], 1
        for n in workers:
            first_ranks.append(rank)
            rank += n
        self._groups_formed += 1
        self._joining = sender
        group_id = f"{id(self):x}-{self._groups_formed}"
        rendezvous = sender.listen_weight_broadcast(rank, sender.weight_broadcast_backend(),
                                                    self.collective_timeout_s, group_id)
        calls = [(e, e.actor.join_weight_broadcast.remote(rendezvous, first))
                 for e, first in zip(engines, first_ranks)]
        self._engines = list(engines)  # so that a failed join is left everywhere
        try:
            sender.join_weight_broadcast()
        except BaseException:
            ray.wait([ref for _, ref in calls], num_returns=len(calls), timeout=self.collective_timeout_s)
            raise
        gather(calls, f"join_weight_broadcast(world_size={rank}, backend={rendezvous['backend']})", self.timeout_s)
        self._source, self._joining, self._members = sender, None, members

    def _leave_group(self) -> None:
        """Best effort, on every member: errors here must not hide the failure that led here."""
        import ray

        source, engines = self._source or self._joining, self._engines
        self._source, self._joining, self._members, self._engines = None, None, None, []
        refs = [e.actor.leave_weight_broadcast.remote() for e in engines if e.alive]
        if source is not None:
            try:
                source.leave_weight_broadcast()
            except Exception:  # noqa: BLE001
                pass
        if refs:
            try:
                ray.wait(refs, num_returns=len(refs), timeout=60)
            except Exception:  # noqa: BLE001
                pass

    def close(self) -> None:
        self._leave_group()
