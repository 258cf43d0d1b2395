"""torch.distributed + Megatron model-parallel initialisation (gloo on CPU, NCCL on GPU)."""

from __future__ import annotations

import os
from datetime import timedelta

import torch


def init_megatron(*, rank: int, world_size: int, master_addr: str = "127.0.0.1", master_port: int,
                  tp_size: int = 1, pp_size: int = 1, seed: int = 1234, local_rank: int | None = None) -> None:
    """Initialises the default process group and Megatron's model-parallel groups.

    On a machine without CUDA this also activates ``skyrl_mtp.megatron.cpu_support``.
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from skyrl_mtp.megatron import cpu_support

    if world_size % (tp_size * pp_size):
        raise ValueError(f"world_size={world_size} is not divisible by tp_size*pp_size={tp_size * pp_size}")
    on_cpu = cpu_support.activate()
    if not on_cpu:
        torch.cuda.set_device(local_rank if local_rank is not None else rank % torch.cuda.device_count())
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            backend="gloo" if on_cpu else "nccl", rank=rank, world_size=world_size,
            init_method=f"tcp://{master_addr}:{master_port}", timeout=timedelta(minutes=10),
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp_size,
                                                 pipeline_model_parallel_size=pp_size)
    # On CPU, the inference tracker's forks are no-ops: Megatron's CUDA RNG tracker has no CPU
    # equivalent, and dropout is 0 in every preset, so nothing random runs inside a fork.
    model_parallel_cuda_manual_seed(seed, inference_rng_tracker=on_cpu)
    torch.manual_seed(seed)


def destroy_megatron() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def free_port() -> int:
    """A free TCP port on loopback (for single-node rendezvous)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_rank() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
