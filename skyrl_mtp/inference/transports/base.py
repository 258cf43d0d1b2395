"""The two-phase weight push every transport shares, its statistics, and the transport registry.

``WeightTransport.push(engines, source, version)`` drives the engines' side of one sync:

    begin_weight_sync(version, transport)   on every engine
    deliver(...)                            the transport's own way of staging the buckets
    prepare_weight_sync(version)            on every engine: the staged set is complete and valid
    finish_weight_sync(version)             on every engine: apply (target and drafter)
    settle_weight_sync(version)             on every engine, once all applied it

and calls ``abort_weight_sync`` on every engine if anything fails before the apply, so a bad or
incomplete set never reaches some engines and not others. If an apply fails, it calls
``rollback_weight_sync`` on every engine: engines that keep a host copy of their previous weights
(``RolloutConfig.keep_weights_for_rollback``) go back to the previous version, so the group again
serves one version; without the copy, the engines that applied stay on the new version and the
group refuses to generate from the mixed set until a sync succeeds. A transport implements ``deliver``
(plus ``connect`` / ``close`` when it keeps a connection) and the engine method that receives its
buckets; it does not touch the phases.

The transports live in their own modules and are looked up by name (``transport_class``) without
this module importing them: ``ray`` (host tensors through Ray's object store), ``cuda_ipc`` (GPU
to GPU for engines on the policy's GPU) and ``broadcast`` (a torch.distributed broadcast from the
policy to every engine).
"""

from __future__ import annotations

import importlib
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

# name -> "module:class"; imported on first use, so nothing here depends on a transport module.
TRANSPORTS: dict[str, str] = {
    "ray": "skyrl_mtp.inference.transports.ray:RayObjectStoreTransport",
    "cuda_ipc": "skyrl_mtp.inference.transports.cuda_ipc:CudaIpcTransport",
    "broadcast": "skyrl_mtp.inference.transports.broadcast:BroadcastTransport",
}


@dataclass
class WeightSyncStats:
    version: int
    transport: str
    num_buckets: int = 0
    num_tensors: int = 0
    nbytes: int = 0
    max_bucket_bytes: int = 0
    total_s: float = 0.0
    deliver_s: float = 0.0  # begin + delivery of every bucket to every engine (before validation and apply)
    per_engine: dict[int, dict[str, Any]] = field(default_factory=dict)

    def add_bucket(self, *, num_whole: int, nbytes: int) -> None:
        """Counts one delivered bucket: tensors that started in it, and its bytes."""
        self.num_buckets += 1
        self.num_tensors += num_whole
        self.nbytes += nbytes
        self.max_bucket_bytes = max(self.max_bucket_bytes, nbytes)


class WeightTransport(ABC):
    """Moves the policy's HF-named tensors into every engine and applies them (see the module
    docstring for the phases). ``push`` leaves every engine either on ``version`` or on its
    previous version. docs/inference.md describes each transport."""

    name: ClassVar[str]

    def __init__(self, bucket_bytes: int, timeout_s: float | None = None):
        if bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
        self.bucket_bytes = bucket_bytes
        self.timeout_s = timeout_s

    def connect(self, engines: Sequence[Any]) -> None:
        """One-time setup with the engines (no-op for transports that need none)."""

    def close(self) -> None:
        """Releases what ``connect`` or a push set up (no-op for transports that keep nothing)."""

    @abstractmethod
    def deliver(self, engines: Sequence[Any], source: Any, version: int, stats: WeightSyncStats) -> None:
        """Stages every bucket of ``source`` on every engine (counting them in ``stats``)."""

    def push(self, engines: Sequence[Any], source: Any, version: int) -> WeightSyncStats:
        """Delivers and applies one full set of weights as ``version`` on every engine.

        All or nothing across engines: every engine stages and validates the whole set before any
        engine applies it, so a failure up to that point (sender, transport, validation, an engine
        that refuses or dies) aborts the sync everywhere and every engine keeps its weights. A
        failure while engines apply rolls every engine back (where they kept their previous
        weights) and raises ``WeightCommitError`` with every engine's state afterwards; engines
        that could not go back make the handles' ``weight_version`` disagree, and the group then
        refuses to generate until a later sync succeeds.
        """
        from skyrl_mtp.inference.remote import gather

        stats = WeightSyncStats(version=version, transport=self.name)
        start = time.perf_counter()
        try:
            gather([(e, e.actor.begin_weight_sync.remote(version, self.name)) for e in engines],
                   f"begin_weight_sync(version={version})", self.timeout_s)
            self.deliver(engines, source, version, stats)
            stats.deliver_s = time.perf_counter() - start
            gather([(e, e.actor.prepare_weight_sync.remote(version)) for e in engines],
                   f"prepare_weight_sync(version={version})", self.timeout_s)
        except BaseException as exc:
            abort_everywhere(engines)
            exc.add_note(f"weight sync to version {version} was aborted before any engine applied it: every engine "
                         "keeps its previous weights and version")
            raise
        stats.per_engine = commit_everywhere(engines, version, self.timeout_s)
        stats.total_s = time.perf_counter() - start
        return stats


def commit_everywhere(engines: Sequence[Any], version: int, timeout_s: float | None) -> dict[int, dict[str, Any]]:
    """Phase 2: every engine applies its staged, validated ``version``, then settles it. If any
    apply fails, every engine is rolled back (see ``WeightTransport``). Records each engine's
    resulting version on its handle; raises ``WeightCommitError`` naming the engines whose apply
    failed and the state every engine is left in."""
    from skyrl_mtp.inference.remote import WeightCommitError, describe_states, gather, gather_outcomes

    outcomes = gather_outcomes([(e, e.actor.finish_weight_sync.remote(version)) for e in engines],
                               f"finish_weight_sync(version={version})", timeout_s)
    failed = [(e, o) for e, o in zip(engines, outcomes) if isinstance(o, Exception)]
    if not failed:
        gather([(e, e.actor.settle_weight_sync.remote(version)) for e in engines],
               f"settle_weight_sync(version={version})", timeout_s)
        for e in engines:
            e.weight_version = version
        return {e.index: o for e, o in zip(engines, outcomes)}
    live = [e for e in engines if e.alive]
    rollbacks = gather_outcomes([(e, e.actor.rollback_weight_sync.remote(version)) for e in live],
                                f"rollback_weight_sync(version={version})", timeout_s)
    not_rolled_back = "".join(f"; {o}" for o in rollbacks if isinstance(o, Exception))
    # Ask the engines rather than guess: a refusal before the apply leaves an engine on its old
    # version, a failed apply (or rollback) leaves it inconsistent; one that does not answer counts
    # as inconsistent.
    states = {}
    for e in engines:
        e.weight_version = None
        if e.alive:
            try:
                e.weight_version = gather([(e, e.actor.weight_state.remote())], "weight_state", 60)[0]
            except Exception:  # noqa: BLE001 - an engine that cannot say is not usable
                pass
        states[e.index] = e.weight_version
    first_engine, first = failed[0]
    others = "".join(f"; also {o}" for _, o in failed[1:])
    versions = set(states.values())
    if None not in versions and len(versions) == 1:
        outcome = f"every engine was rolled back to version {versions.pop()} and can generate from it"
    else:
        outcome = (f"not every engine could be rolled back{not_rolled_back}. Engines now: {describe_states(states)}; "
                   "the group refuses to generate until a weight sync succeeds")
    raise WeightCommitError(
        first_engine.index, f"weight sync to version {version} failed while engines applied it: {first}{others}. "
                            f"{outcome}", first, states)


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
    """The transport registered as ``name`` (see ``TRANSPORTS``)."""
    if name not in TRANSPORTS:
        raise ValueError(f"unknown weight transport {name!r}; known: {sorted(TRANSPORTS)}")
    module, cls = TRANSPORTS[name].split(":")
    transport = getattr(importlib.import_module(module), cls)
    if transport.name != name:
        raise RuntimeError(f"weight transport registry: {TRANSPORTS[name]} calls itself {transport.name!r}, not {name!r}")
    return transport
