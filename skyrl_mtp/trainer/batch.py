"""Rollouts -> the padded tensors the policy workers train on."""

from __future__ import annotations

import torch


def build_batch(prompt_ids: list[list[int]], response_ids: list[list[int]], *, pad_id: int,
                pad_to_multiple: int = 8) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids [N, S]`` and ``loss_mask [N, S]``.

    ``loss_mask[i, t] = 1`` where the logits at t predict a response token of sequence i, i.e.
    ``len(prompt) - 1 <= t < len(prompt) + len(response) - 1``. Padding only ever follows real
    tokens, so under causal attention it changes nothing before it. S is rounded up to a multiple
    of `pad_to_multiple` to limit the number of distinct shapes.
    """
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses")
    lengths = [len(p) + len(r) for p, r in zip(prompt_ids, response_ids)]
    seq = max(lengths)
    seq = -(-seq // pad_to_multiple) * pad_to_multiple
    input_ids = torch.full((len(lengths), seq), pad_id, dtype=torch.long)
    loss_mask = torch.zeros(len(lengths), seq)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        if not p:
            raise ValueError(f"rollout {i} has an empty prompt")
        input_ids[i, : len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
        loss_mask[i, len(p) - 1: len(p) + len(r) - 1] = 1.0
    return {"input_ids": input_ids, "loss_mask": loss_mask}
