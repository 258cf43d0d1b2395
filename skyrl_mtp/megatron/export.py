"""Megatron modules -> full HF-named tensors (TP shards gathered), and HF checkpoints on disk.

Used for the rollout engines' weight sync (every step) and the final HF export.
"""

from __future__ import annotations

from pathlib import Path

import torch

from skyrl_mtp.megatron.bridge import MimoBridge, module_state


def gather_megatron_state(trunk: torch.nn.Module, head: torch.nn.Module | None, bridge: MimoBridge,
                          tp_group=None) -> dict[str, torch.Tensor]:
    """This rank's trunk (+ head, under ``mtp.``) tensors, gathered over the TP group into full tensors.

    Every TP rank must call it (all_gather is collective); every rank gets the full tensors.
    """
    local = module_state(trunk)
    if head is not None:
        local.update(module_state(head, prefix="mtp."))
    tp_size = 1 if tp_group is None else torch.distributed.get_world_size(tp_group)
    if tp_size == 1:
        return {k: v.detach() for k, v in local.items()}
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(tp_size)]
    for name in sorted(local):  # same order on every rank
        tensor = local[name].detach().contiguous()
        parts = [torch.empty_like(tensor) for _ in range(tp_size)]
        torch.distributed.all_gather(parts, tensor, group=tp_group)
        for rank, part in enumerate(parts):
            shards[rank][name] = part
    return bridge.gather_tp(shards)


def export_hf_tensors(trunk, head, bridge: MimoBridge, tp_group=None, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """HF-named tensors of the policy (and its MTP head), ready for vLLM or a checkpoint."""
    hf = bridge.megatron_to_hf(gather_megatron_state(trunk, head, bridge, tp_group))
    if dtype is not None:
        hf = {k: v.to(dtype) for k, v in hf.items()}
    return hf


def export_hf_checkpoint(trunk, head, bridge: MimoBridge, out_dir: str | Path, *, tp_group=None,
                         write: bool = True, torch_dtype: str = "float32",
                         max_shard_bytes: int | None = None) -> Path | None:
    """Writes an HF checkpoint (with MTP layers when `head` is given). Collective over the TP group;
    only ranks with ``write=True`` touch the disk. With `max_shard_bytes` the weights are shards
    with ``model.safetensors.index.json`` (see ``models.checkpoint.save_hf_checkpoint``)."""
    from skyrl_mtp.models.checkpoint import save_hf_checkpoint

    hf = export_hf_tensors(trunk, head, bridge, tp_group)
    if not write:
        return None
    cfg = bridge.cfg if head is not None else bridge.cfg.replace(num_mtp_layers=0)
    return save_hf_checkpoint(cfg, hf, out_dir, torch_dtype=torch_dtype, max_shard_bytes=max_shard_bytes)
