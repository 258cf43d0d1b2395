"""``RolloutEngineGroup``: the driver-side handle over ``num_engines`` rollout engines (data
parallel; tensor parallel inside each engine on GPU).

Owns: starting the engine actors (in parallel), splitting prompts across them, fanning weight
syncs out through a ``WeightTransport``, the metrics windows over all engines, and engine failures:
every error names the engine (index, pid) and its cause. An engine whose actor died is marked
dead; ``generate``/``sync_weights`` then refuse to run (naming it) until the caller drops it with
``remove_dead_engines()`` (or ``remove_engine(i)``), after which the remaining engines carry on.
The group never silently re-routes work: a lost engine changes throughput and the caller decides.

Ray must already be initialised by the caller (the RL driver, a test, a script).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from skyrl_mtp.inference.config import RolloutConfig, SamplingConfig
from skyrl_mtp.inference.engine import (
    EngineGeneration,
    EngineInfo,
    RolloutEngine,
    RolloutSample,
    engine_env,
    validate_prompts,
)
from skyrl_mtp.inference.metrics import SpecDecodeCounters, SpecDecodeMetricsTracker
from skyrl_mtp.inference.remote import (
    EngineDiedError,
    EngineHandle,
    MixedWeightVersionsError,
    RolloutEngineError,
    describe_states,
    gather,
)
from skyrl_mtp.inference.transports.base import WeightSyncStats, WeightTransport, transport_class
from skyrl_mtp.inference.transports.buckets import NamedTensors

_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


def shard_bounds(num_items: int, num_shards: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, end)`` ranges splitting ``num_items`` into ``num_shards`` parts whose
    sizes differ by at most one (the first ``num_items % num_shards`` get the extra item).
    Contiguity keeps each prompt's n samples, and neighbouring prompts, on one engine."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    base, extra = divmod(num_items, num_shards)
    bounds, start = [], 0
    for i in range(num_shards):
        end = start + base + (1 if i < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def check_local_checkpoint(model_path: str) -> None:
    """A path that looks local must be a checkpoint directory (else vLLM would try the Hub, in
    every engine, after its slow start-up). Model ids such as "org/name" pass through."""
    path = Path(model_path)
    looks_local = path.is_absolute() or model_path.startswith(".") or path.exists()
    if looks_local and not (path / "config.json").is_file():
        raise FileNotFoundError(f"model_path {model_path!r} is not a checkpoint directory (no config.json)")


def engine_actor_options(config: RolloutConfig, device: str) -> dict[str, Any]:
    """Ray actor options for one engine: resources and the environment vLLM needs at import."""
    pythonpath = os.pathsep.join(p for p in (_PACKAGE_ROOT, os.environ.get("PYTHONPATH", "")) if p)
    env = {**engine_env(config, device), "PYTHONPATH": pythonpath}
    options: dict[str, Any] = {"num_cpus": config.num_cpus_per_engine, "runtime_env": {"env_vars": env},
                               "max_restarts": 0, "max_task_retries": 0}
    if device == "cuda":
        options["num_gpus"] = config.gpus_per_engine()
    return options


class RolloutEngineGroup:
    """``num_engines`` engines behind one API. Public methods block until every engine answered."""

    def __init__(self, config: RolloutConfig, transport: WeightTransport | None = None):
        import ray

        if not isinstance(config, RolloutConfig):
            raise TypeError(f"expected a RolloutConfig, got {type(config).__name__}")
        check_local_checkpoint(config.model_path)
        if not ray.is_initialized():
            raise RuntimeError("RolloutEngineGroup needs Ray: call ray.init(...) first")
        if transport is None:
            transport = transport_class(config.weight_transport)(bucket_bytes=config.bucket_bytes,
                                                                 timeout_s=config.call_timeout_s)
        self.config = config
        self.transport = transport
        self.device = config.resolved_device()
        self._weight_version = 0
        self._last_attempted_version = 0
        self._infos: dict[int, EngineInfo] = {}
        self.engines: list[EngineHandle] = self._start_engines()
        self.transport.connect(self.engines)
        self.metrics = SpecDecodeMetricsTracker(self.read_counters)

    # -- lifecycle ------------------------------------------------------------------------------

    def _start_engines(self) -> list[EngineHandle]:
        import ray

        self._check_cluster_fits()
        actor_cls = ray.remote(RolloutEngine)
        options = engine_actor_options(self.config, self.device)
        engines = [EngineHandle(i, actor_cls.options(**options).remote(self.config, i))
                   for i in range(self.config.num_engines)]
        try:
            infos = gather([(e, e.actor.info.remote()) for e in engines], "start-up", self.config.startup_timeout_s)
        except RolloutEngineError:
            for e in engines:
                ray.kill(e.actor, no_restart=True)
            raise
        for e, info in zip(engines, infos):
            e.pid = info.pid
            self._infos[e.index] = info
        return engines

    def _check_cluster_fits(self) -> None:
        """Engines the cluster can never place would wait forever: refuse them up front."""
        import ray

        total = ray.cluster_resources()
        need = {"CPU": self.config.num_cpus_per_engine * self.config.num_engines}
        if self.device == "cuda":
            need["GPU"] = self.config.gpus_per_engine() * self.config.num_engines
        for resource, amount in need.items():
            if amount > total.get(resource, 0.0):
                raise RuntimeError(f"{self.config.num_engines} rollout engines need {amount:g} {resource} in total; "
                                   f"the Ray cluster has {total.get(resource, 0.0):g}")

    def shutdown(self) -> None:
        """Frees every engine and kills the actors. The group is unusable afterwards."""
        import ray

        try:
            self.transport.close()
        except Exception:  # noqa: BLE001 - shutting down regardless
            pass
        live = [e for e in self.engines if e.alive]
        if live:
            ray.wait([e.actor.shutdown.remote() for e in live], num_returns=len(live), timeout=60)
        for e in self.engines:
            ray.kill(e.actor, no_restart=True)
        self.engines = []

    @property
    def live_engines(self) -> list[EngineHandle]:
        return [e for e in self.engines if e.alive]

    @property
    def infos(self) -> dict[int, EngineInfo]:
        return {e.index: self._infos[e.index] for e in self.engines}

    def engine(self, index: int) -> EngineHandle:
        for e in self.engines:
            if e.index == index:
                return e
        raise KeyError(f"no rollout engine {index} in this group (engines: {[e.index for e in self.engines]})")

    def check_health(self, timeout_s: float = 30.0) -> dict[int, bool]:
        """Pings every engine; marks (and reports) the ones that do not answer as dead."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        health = {}
        for e in self.engines:
            if e.alive:
                try:
                    ray.get(e.actor.ping.remote(), timeout=timeout_s)
                except (RayActorError, GetTimeoutError) as exc:
                    e.alive, e.death_cause = False, f"{type(exc).__name__}: {exc}".split("\n")[0]
            health[e.index] = e.alive
        return health

    def remove_engine(self, index: int) -> None:
        """Drops engine ``index`` from the group (killing its actor if it still runs)."""
        import ray

        e = self.engine(index)
        ray.kill(e.actor, no_restart=True)
        self.engines.remove(e)

    def remove_dead_engines(self) -> list[int]:
        """Drops every engine known to be dead; returns their indices."""
        import ray

        dead = [e for e in self.engines if not e.alive]
        for e in dead:
            ray.kill(e.actor, no_restart=True)  # a hung (timed-out) actor may still hold resources
        self.engines = [e for e in self.engines if e.alive]
        return [e.index for e in dead]

    def _require_all_alive(self, what: str) -> list[EngineHandle]:
        dead = [e for e in self.engines if not e.alive]
        if dead:
            e = dead[0]
            raise EngineDiedError(e.index, f"cannot {what}: {e.describe()} is dead ({e.death_cause}); "
                                           "call remove_dead_engines() to continue with the others")
        if not self.engines:
            raise RuntimeError(f"cannot {what}: the group has no engines")
        return self.engines

    def _require_one_version(self, engines: list[EngineHandle]) -> None:
        """Generation comes from one complete set of weights or not at all: after a sync that failed
        while engines applied it, some may serve the new version and some the old (or neither)."""
        states = {e.index: e.weight_version for e in engines}
        if None in states.values() or len(set(states.values())) > 1:
            raise MixedWeightVersionsError(
                f"cannot generate: the rollout engines do not serve one weight version ({describe_states(states)}) "
                "after a weight sync failed while they applied it; a successful sync_weights brings them together "
                "(or remove_engine() the odd ones)", states)

    # -- generation -----------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig,
                 seeds: Sequence[int] | None = None,
                 max_tokens: Sequence[int] | None = None) -> list[list[RolloutSample]]:
        """``sampling.n`` samples for each prompt (token-id lists), as ``result[prompt][sample]``,
        with prompts split evenly (contiguously) across the engines. ``seeds`` (one per prompt)
        give each request its own random stream; ``max_tokens`` (one per prompt) its own budget."""
        return self.generate_detailed(prompts, sampling, seeds, max_tokens)[0]

    def generate_detailed(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig,
                          seeds: Sequence[int] | None = None, max_tokens: Sequence[int] | None = None,
                          ) -> tuple[list[list[RolloutSample]], list[EngineGeneration]]:
        """Like ``generate`` and also returns each engine's ``EngineGeneration`` (timing, token counts)."""
        if not isinstance(sampling, SamplingConfig):
            raise TypeError(f"expected a SamplingConfig, got {type(sampling).__name__}")
        for name, values in (("seeds", seeds), ("max_tokens", max_tokens)):
            if values is not None and len(values) != len(prompts):
                raise ValueError(f"{len(values)} {name} for {len(prompts)} prompts; pass one per prompt")
        engines = self._require_all_alive("generate")
        self._require_one_version(engines)
        bounds = shard_bounds(len(prompts), len(engines))
        # Validate every prompt against the engine it is bound for before any engine starts work.
        ids: list[list[int]] = []
        for e, (lo, hi) in zip(engines, bounds):
            ids += validate_prompts(prompts[lo:hi], self._infos[e.index].max_model_len,
                                    where=f"{e.describe()}", vocab_size=self._infos[e.index].vocab_size,
                                    first_index=lo)
        calls = [(e, e.actor.generate.remote(ids[lo:hi], sampling, lo,
                                             None if seeds is None else [int(s) for s in seeds[lo:hi]],
                                             None if max_tokens is None else [int(m) for m in max_tokens[lo:hi]]))
                 for e, (lo, hi) in zip(engines, bounds) if hi > lo]
        results: list[EngineGeneration] = gather(calls, "generate", self.config.call_timeout_s)
        samples = [per_prompt for r in results for per_prompt in r.samples]
        return samples, results

    # -- weights --------------------------------------------------------------------------------

    @property
    def weight_version(self) -> int:
        """The last version every engine applied."""
        return self._weight_version

    def engine_versions(self) -> dict[int, int | None]:
        """Each engine's weight version as the last sync left it (None: inconsistent or unknown)."""
        return {e.index: e.weight_version for e in self.engines}

    def sync_weights(self, named_tensors: NamedTensors | Any, version: int | None = None) -> WeightSyncStats:
        """Loads HF-named tensors (the checkpoint's names, MTP head included) into every engine's
        target model and drafter, resets their prefix caches and sets their weight version to
        ``version`` (default: current + 1). Every engine stages and validates the whole set before
        any applies it, so a failure before the apply leaves all engines on the old version; a
        failure while applying raises ``WeightCommitError`` and ``generate`` then refuses until a
        sync succeeds (``engine_versions()`` shows the state). With the cuda_ipc transport the
        source is the policy workers (an ``IpcWeightSource``)."""
        engines = self._require_all_alive("sync weights")
        floor = max(self._weight_version, self._last_attempted_version)
        version = floor + 1 if version is None else version
        if not isinstance(version, int) or isinstance(version, bool) or version <= floor:
            raise ValueError(f"weight version must be an int above {floor} (current {self._weight_version}, "
                             f"last attempted {self._last_attempted_version}), got {version!r}")
        # A failed sync may have applied `version` on some engines (only an apply-time failure can
        # do that): never reuse it, so each engine's version keeps identifying one set of weights.
        self._last_attempted_version = version
        stats = self.transport.push(engines, named_tensors, version)
        self._weight_version = version
        return stats

    # -- metrics --------------------------------------------------------------------------------

    def read_counters(self) -> dict[int, SpecDecodeCounters]:
        """Cumulative spec-decode counters per live engine (engines that died are skipped: a
        metrics read must not turn an engine failure into a second error)."""
        live = self.live_engines
        counters: dict[int, SpecDecodeCounters] = {}
        for e, ref in [(e, e.actor.spec_decode_counters.remote()) for e in live]:
            try:
                counters[e.index] = gather([(e, ref)], "spec_decode_counters", self.config.call_timeout_s)[0]
            except EngineDiedError:
                continue
        return counters

    def set_num_draft_tokens(self, k: int) -> None:
        """Every engine drafts ``k`` tokens per step from the next generation on (engines started
        with ``runtime_draft_tokens``; 0 switches drafting off)."""
        engines = self._require_all_alive("set the number of draft tokens")
        gather([(e, e.actor.set_num_draft_tokens.remote(k)) for e in engines], "set_num_draft_tokens",
               self.config.call_timeout_s)

    def sleep(self) -> float:
        """Every engine sleeps (RolloutConfig.sleep_level); returns the slowest engine's seconds."""
        engines = self._require_all_alive("sleep")
        return max(gather([(e, e.actor.sleep.remote()) for e in engines], "sleep", self.config.call_timeout_s))

    def wake_up(self, tags: list[str] | None = None) -> float:
        """Every engine restores `tags` (weights, kv_cache; None: both); the slowest engine's seconds."""
        engines = self._require_all_alive("wake up")
        return max(gather([(e, e.actor.wake_up.remote(tags)) for e in engines], "wake_up", self.config.call_timeout_s))

    def memory_stats(self) -> list[dict[str, float]]:
        """Each live engine process's memory (skyrl_mtp.logging.memory.process_memory)."""
        live = self.live_engines
        return gather([(e, e.actor.memory_stats.remote()) for e in live], "memory_stats", self.config.call_timeout_s)

    def reset_prefix_caches(self) -> None:
        engines = self._require_all_alive("reset prefix caches")
        gather([(e, e.actor.reset_prefix_cache.remote()) for e in engines], "reset_prefix_cache",
               self.config.call_timeout_s)

    def __repr__(self) -> str:
        state = ", ".join(f"{e.index}:{'up' if e.alive else 'dead'}" for e in self.engines)
        return (f"RolloutEngineGroup(model={self.config.model_path!r}, engines=[{state}], "
                f"version={self._weight_version})")
