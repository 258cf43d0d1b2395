"""Ray actors around :class:`MegatronPolicy` (one actor per rank) and the group that drives them.

``PolicyWorker`` trains (policy + MTP head); ``RefWorker`` is the frozen reference policy that
only computes log-probabilities. A :class:`WorkerGroup` starts ``dp * tp * pp`` actors, wires up
the rendezvous (rank 0's address, a free port), splits each batch over data-parallel ranks (all TP
ranks and pipeline stages of a DP rank get the same shard) and collects log-probs and metrics from
TP rank 0 of the last pipeline stage, where the loss is computed, and weights from the rank that
holds the export (TP rank 0, DP rank 0, first stage).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import ray
import torch

from skyrl_mtp.workers.config import PolicyWorkerConfig


def _release_cached_memory() -> None:
    """Give the allocator's cached blocks (activations, logits of the phase just done) back to the
    device: a colocated engine wakes into that memory next (on one H200 with a 7B policy, ~24 GB
    that the weight sync's apply then lacked)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class _PolicyActor:
    def __init__(self, cfg: PolicyWorkerConfig, rank: int, world_size: int, master_addr: str, master_port: int,
                 trainable: bool, num_threads: int | None):
        from skyrl_mtp.logging.process_output import redirect_to_run_log

        redirect_to_run_log(f"{'policy' if trainable else 'ref'}_rank{rank}")
        if num_threads:
            torch.set_num_threads(num_threads)
        from skyrl_mtp.workers.policy import MegatronPolicy

        self.policy = MegatronPolicy(cfg, rank=rank, world_size=world_size, master_addr=master_addr,
                                     master_port=master_port, trainable=trainable)

    def _ensure_thread(self):
        # Ray may run actor methods on a thread other than __init__'s: keep the CPU redirect active.
        from skyrl_mtp.megatron import cpu_support

        cpu_support.activate()

    def layout(self) -> dict[str, int]:
        p = self.policy
        return {"dp_rank": p.dp_rank, "tp_rank": p.tp_rank, "dp_size": p.dp_size, "last_stage": p.stage.last,
                "holds_export": p.holds_export}

    def compute_logprobs(self, batch):
        self._ensure_thread()
        try:
            return self.policy.compute_logprobs(batch)
        finally:
            _release_cached_memory()

    def train_step(self, batch):
        self._ensure_thread()
        try:
            return self.policy.train_step(batch)
        finally:
            _release_cached_memory()

    def export_hf_weights(self):
        self._ensure_thread()
        return self.policy.export_hf_weights()

    def save_hf_export(self, out_dir: str, max_shard_bytes: int | None):
        self._ensure_thread()
        return self.policy.save_hf_export(out_dir, extras=getattr(self, "_export_extras", None),
                                          max_shard_bytes=max_shard_bytes)

    # -- GPU weight sync (cuda_ipc transport; the sending side lives on the rank that holds the weights)

    def set_export_extras(self, tensors: dict[str, torch.Tensor]) -> None:
        """Tensors sent with every GPU weight sync besides the policy's own (the checkpoint's frozen
        MTP head when MTP is off: the engines' drafter needs a complete set)."""
        device = self.policy.device
        self._export_extras = {k: v.to(device) for k, v in tensors.items()}

    def open_ipc_weights(self, version: int, bucket_bytes: int) -> int | None:
        """Collective over the TP group: exports the weights on the GPU; the holding rank plans the
        buckets and returns their count (None on other ranks)."""
        from skyrl_mtp.inference.transports.cuda_ipc import IpcWeightSender

        self._ensure_thread()
        self._ipc_sender = None
        hf = self.policy.export_hf_weights(on_device=True)
        if hf is None:
            return None
        hf = {**getattr(self, "_export_extras", {}), **hf}
        self._ipc_sender = IpcWeightSender(hf, bucket_bytes)
        self._ipc_version = version
        return self._ipc_sender.num_buckets

    def ipc_weight_bucket(self, index: int):
        if getattr(self, "_ipc_sender", None) is None:
            raise RuntimeError(f"policy tp_rank {self.policy.tp_rank} dp_rank {self.policy.dp_rank}: no GPU weight export is open")
        return self._ipc_sender.bucket(index)

    def close_ipc_weights(self) -> None:
        sender, self._ipc_sender = getattr(self, "_ipc_sender", None), None
        if sender is not None:
            sender.close()

    # -- weight broadcast (broadcast transport): the holding rank is rank 0 of the broadcast group

    def weight_broadcast_backend(self) -> str:
        return "nccl" if self.policy.device.type == "cuda" else "gloo"

    def listen_weight_broadcast(self, world_size: int, backend: str, timeout_s: float, group_id: str) -> dict:
        from skyrl_mtp.inference.transports.broadcast import BroadcastWeightSender

        self.leave_weight_broadcast()
        self._broadcast = BroadcastWeightSender()
        return self._broadcast.listen(world_size, backend, timeout_s, group_id)

    def join_weight_broadcast(self) -> None:
        self._ensure_thread()
        self._broadcast.join()

    def open_broadcast_weights(self, version: int, bucket_bytes: int):
        """Collective over the TP group: exports the weights where they are; the holding rank
        plans the buckets and returns their specs (None on other ranks)."""
        self._ensure_thread()
        hf = self.policy.export_hf_weights(on_device=True)
        if hf is None:
            return None
        if getattr(self, "_broadcast", None) is None:
            raise RuntimeError(f"policy tp_rank {self.policy.tp_rank} dp_rank {self.policy.dp_rank}: not in a weight-broadcast group")
        return self._broadcast.open({**getattr(self, "_export_extras", {}), **hf}, bucket_bytes)

    def broadcast_weight_bucket(self, index: int) -> int:
        self._ensure_thread()
        return self._broadcast.send(index)

    def close_broadcast_weights(self) -> None:
        if getattr(self, "_broadcast", None) is not None:
            self._broadcast.close_weights()

    def leave_weight_broadcast(self) -> None:
        sender, self._broadcast = getattr(self, "_broadcast", None), None
        if sender is not None:
            sender.leave()

    def save_checkpoint(self, directory: str, extra: dict | None = None):
        self._ensure_thread()
        self.policy.save_checkpoint(directory, extra)

    def load_checkpoint(self, directory: str):
        self._ensure_thread()
        return self.policy.load_checkpoint(directory)

    def memory_stats(self, reset_peak: bool = False) -> dict[str, float]:
        from skyrl_mtp.logging.memory import process_memory

        return process_memory(reset_peak=reset_peak)

    def model_info(self) -> dict[str, Any]:
        cfg = self.policy.model_cfg
        return {"vocab_size": cfg.vocab_size, "num_mtp_layers": cfg.num_mtp_layers, "step": self.policy.step}


def _node_ip() -> str:
    return ray.util.get_node_ip_address()


class WorkerGroup:
    """``dp * tp`` policy (or reference) actors behaving like one data-parallel policy."""

    def __init__(self, cfg: PolicyWorkerConfig, *, dp_size: int = 1, trainable: bool = True,
                 num_cpus_per_worker: float = 1.0, num_gpus_per_worker: float = 0.0,
                 num_threads: int | None = None, name: str = "policy", startup_timeout_s: float = 900.0):
        world = dp_size * cfg.megatron.tp_size * cfg.megatron.pp_size
        actor_cls = ray.remote(num_cpus=num_cpus_per_worker, num_gpus=num_gpus_per_worker)(_PolicyActor)
        master_addr = _node_ip() if world > 1 else "127.0.0.1"
        from skyrl_mtp.megatron.parallel import free_port

        port = free_port()
        env = {"env_vars": {"OMP_NUM_THREADS": str(num_threads or 1)}}
        self.name = name
        self.actors = [actor_cls.options(name=None, runtime_env=env).remote(
            cfg, r, world, master_addr, port, trainable, num_threads) for r in range(world)]
        try:
            self.layouts = ray.get([a.layout.remote() for a in self.actors], timeout=startup_timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise RuntimeError(f"{name}: {world} worker actor(s) did not start within {startup_timeout_s:.0f}s; "
                               f"the Ray cluster may lack the resources asked for ({num_cpus_per_worker} CPU, "
                               f"{num_gpus_per_worker} GPU each): {ray.available_resources()}") from None
        self.dp_size = self.layouts[0]["dp_size"]

    def _shards(self, batch: dict[str, torch.Tensor]):
        """Contiguous, equal shards per DP rank (all TP ranks of a DP rank get the same one). A
        batch whose rows do not divide by dp_size is padded with rows that count nowhere (all
        zeros, loss_mask 0): groups are never cut and fewer rows than ranks still work, since
        the workers normalise by global counts."""
        n = batch["input_ids"].shape[0]
        per = -(-n // self.dp_size)
        if per * self.dp_size != n:
            extra = per * self.dp_size - n
            batch = {k: torch.cat([v, v.new_zeros((extra, *v.shape[1:]))]) for k, v in batch.items()}
        for layout in self.layouts:
            r = layout["dp_rank"]
            yield {k: v[r * per:(r + 1) * per] for k, v in batch.items()}

    def _call(self, method: str, batch):
        refs = [getattr(a, method).remote(shard) for a, shard in zip(self.actors, self._shards(batch))]
        return ray.get(refs)

    def compute_logprobs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        n = batch["input_ids"].shape[0]
        results = self._call("compute_logprobs", batch)
        by_dp = {lay["dp_rank"]: res for res, lay in zip(results, self.layouts)
                 if lay["tp_rank"] == 0 and lay["last_stage"]}
        return {k: torch.cat([by_dp[r][k] for r in range(self.dp_size)])[:n] for k in by_dp[0]}

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One optimizer step on `batch` (one PPO mini-batch), split over the DP ranks."""
        return self._call("train_step", batch)[self._reporter]

    def export_hf_weights(self) -> dict[str, torch.Tensor]:
        return next(w for w in ray.get([a.export_hf_weights.remote() for a in self.actors]) if w is not None)

    def save_hf_export(self, out_dir: str | Path, max_shard_bytes: int | None = None) -> Path:
        """The export holder writes the HF checkpoint itself (the weights never travel through Ray);
        `out_dir` must be on storage that rank sees, as for checkpoints."""
        paths = ray.get([a.save_hf_export.remote(str(out_dir), max_shard_bytes) for a in self.actors])
        return next(Path(p) for p in paths if p is not None)

    # -- the IpcWeightSource of skyrl_mtp.inference.transports.cuda_ipc: the rank holding the full weights sends

    def set_export_extras(self, tensors: dict[str, torch.Tensor]) -> None:
        ray.get(self.actors[self._holder].set_export_extras.remote(tensors))

    def open_ipc_weights(self, version: int, bucket_bytes: int) -> int:
        return ray.get([a.open_ipc_weights.remote(version, bucket_bytes) for a in self.actors])[self._holder]

    def ipc_weight_bucket(self, index: int):
        return ray.get(self.actors[self._holder].ipc_weight_bucket.remote(index))

    def close_ipc_weights(self) -> None:
        ray.get([a.close_ipc_weights.remote() for a in self.actors])

    # -- the BroadcastWeightSource of skyrl_mtp.inference.transports.broadcast: the holding rank is rank 0

    def weight_broadcast_backend(self) -> str:
        return ray.get(self.actors[self._holder].weight_broadcast_backend.remote())

    def listen_weight_broadcast(self, world_size: int, backend: str, timeout_s: float, group_id: str) -> dict:
        return ray.get(self.actors[self._holder].listen_weight_broadcast.remote(world_size, backend, timeout_s, group_id))

    def join_weight_broadcast(self) -> None:
        ray.get(self.actors[self._holder].join_weight_broadcast.remote())

    def open_broadcast_weights(self, version: int, bucket_bytes: int):
        return ray.get([a.open_broadcast_weights.remote(version, bucket_bytes) for a in self.actors])[self._holder]

    def broadcast_weight_bucket(self, index: int) -> int:
        return ray.get(self.actors[self._holder].broadcast_weight_bucket.remote(index))

    def close_broadcast_weights(self) -> None:
        ray.get([a.close_broadcast_weights.remote() for a in self.actors])

    def leave_weight_broadcast(self) -> None:
        ray.get(self.actors[self._holder].leave_weight_broadcast.remote())

    @property
    def _holder(self) -> int:
        """Index of the actor that holds the exported weights (TP rank 0 of DP rank 0, first stage)."""
        return next(i for i, lay in enumerate(self.layouts) if lay["holds_export"])

    @property
    def _reporter(self) -> int:
        """Index of the actor whose metrics cover the whole step (TP rank 0 of DP rank 0 of the last
        stage: the loss and draft metrics, reduced over DP, and the global grad norms)."""
        return next(i for i, lay in enumerate(self.layouts)
                    if lay["dp_rank"] == 0 and lay["tp_rank"] == 0 and lay["last_stage"])

    def save_checkpoint(self, directory: str, extra: dict | None = None) -> None:
        ray.get([a.save_checkpoint.remote(directory, extra) for a in self.actors])

    def load_checkpoint(self, directory: str) -> dict:
        return ray.get([a.load_checkpoint.remote(directory) for a in self.actors])[0]

    def memory_stats(self, reset_peak: bool = False) -> list[dict[str, float]]:
        """Each rank's memory (skyrl_mtp.logging.memory); with reset_peak the CUDA peak restarts."""
        return ray.get([a.memory_stats.remote(reset_peak) for a in self.actors])

    def model_info(self) -> dict[str, Any]:
        return ray.get(self.actors[0].model_info.remote())

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)
        self.actors = []


def ray_init_local(num_cpus: int | None = None, address: str | None = None, dashboard: bool = False,
                   actor_log_dir: str | None = None) -> None:
    """Local Ray by default (dashboard off, or on loopback), or attach to `address` for a cluster.
    With `actor_log_dir`, every actor writes its output to a file there instead of the console
    (skyrl_mtp.logging.process_output)."""
    if ray.is_initialized():
        return
    from skyrl_mtp.logging.process_output import ACTOR_LOG_DIR_ENV

    quiet = actor_log_dir is not None
    runtime_env = {"env_vars": {ACTOR_LOG_DIR_ENV: str(actor_log_dir)}} if quiet else None
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=not quiet)
        return
    os.environ.pop("RAY_ADDRESS", None)
    # A local cluster lives on loopback only: its GCS, raylet, object store and (optional) dashboard.
    ray.init(num_cpus=num_cpus, include_dashboard=dashboard, dashboard_host="127.0.0.1",
             _node_ip_address="127.0.0.1", log_to_driver=not quiet, configure_logging=False,
             runtime_env=runtime_env)
