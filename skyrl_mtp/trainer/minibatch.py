"""Rollouts -> the padded tensors the policy workers train on, and their split into PPO
mini-batches (one optimizer step each).

Tensors are ``[N, S]`` and right-padded; ``loss_mask[i, t] = 1`` where the logits at t predict a
response token of sequence i. Per-token tensors the driver adds (``advantages``,
``rollout_logprobs``, ``old_logprobs``, ``ref_logprobs``) share that alignment.
"""

from __future__ import annotations

import torch

from skyrl_mtp.config.schema import AlgorithmConfig
from skyrl_mtp.rl.advantages import compute_advantages
from skyrl_mtp.rl.shaping import overlong_filter_mask
from skyrl_mtp.trainer.rollout import RolloutBatch

PAD_TO_MULTIPLE = 8  # sequence lengths are rounded up to this, to limit the number of distinct shapes


def build_batch(prompt_ids: list[list[int]], response_ids: list[list[int]], *, pad_id: int,
                response_masks: list[list[int]] | None = None,
                pad_to_multiple: int = PAD_TO_MULTIPLE) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids [N, S]`` and ``loss_mask [N, S]``.

    ``loss_mask[i, t] = 1`` where the logits at t predict a response token of sequence i, i.e.
    ``len(prompt) - 1 <= t < len(prompt) + len(response) - 1``, and that token is the model's
    (``response_masks``, 1 per model token, 0 per environment observation token; all 1 if not
    given). Padding only ever follows real tokens, so under causal attention it changes nothing
    before it.
    """
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses")
    lengths = [len(p) + len(r) for p, r in zip(prompt_ids, response_ids)]
    seq = -(-max(lengths) // pad_to_multiple) * pad_to_multiple
    input_ids = torch.full((len(lengths), seq), pad_id, dtype=torch.long)
    loss_mask = torch.zeros(len(lengths), seq)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        if not p:
            raise ValueError(f"rollout {i} has an empty prompt")
        input_ids[i, : len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
        mask = [1.0] * len(r) if response_masks is None else [float(m) for m in response_masks[i]]
        if len(mask) != len(r):
            raise ValueError(f"rollout {i}: {len(mask)} mask entries for {len(r)} response tokens")
        loss_mask[i, len(p) - 1: len(p) + len(r) - 1] = torch.tensor(mask)
    return {"input_ids": input_ids, "loss_mask": loss_mask}


def rollout_tensors(batch: RolloutBatch, algorithm: AlgorithmConfig, *, pad_id: int) -> dict[str, torch.Tensor]:
    """The whole rollout batch as training tensors: ids, loss mask (observation tokens and, with
    DAPO's overlong filter, truncated responses masked out), per-token advantages (computed over
    complete groups) and the engine's log-probs of the sampled tokens."""
    rollouts = batch.rollouts
    tensors = build_batch([r.prompt_ids for r in rollouts], [r.response_ids for r in rollouts], pad_id=pad_id,
                          response_masks=[r.response_mask for r in rollouts])
    if algorithm.overlong.filter:
        tensors["loss_mask"] *= overlong_filter_mask([r.finish_reason for r in rollouts])[:, None]
    adv = compute_advantages(torch.tensor([r.reward for r in rollouts]), group_ids=[r.group for r in rollouts],
                             estimator=algorithm.advantage_estimator, norm_by_std=algorithm.norm_adv_by_std)
    tensors["advantages"] = adv[:, None] * tensors["loss_mask"]
    if all(r.logprobs is not None for r in rollouts):
        rollout_lp = torch.zeros_like(tensors["loss_mask"])
        for i, r in enumerate(rollouts):
            start = len(r.prompt_ids) - 1
            rollout_lp[i, start:start + len(r.logprobs)] = torch.tensor(r.logprobs)
        tensors["rollout_logprobs"] = rollout_lp
    return tensors


def mini_batch_rows(batch: RolloutBatch, groups_per_step: int | None, *, epochs: int,
                    generator: torch.Generator) -> list[list[int]]:
    """Row indices of each optimizer step: per epoch the groups are shuffled and cut into
    mini-batches of `groups_per_step` whole groups (None: the whole batch, unshuffled). A last
    mini-batch with fewer groups is kept, so every rollout is trained on once per epoch."""
    members: dict[int, list[int]] = {}
    for i, r in enumerate(batch.rollouts):
        members.setdefault(r.group, []).append(i)
    groups = list(members.values())
    per_step = len(groups) if groups_per_step is None else groups_per_step
    if per_step >= len(groups) and epochs == 1:
        return [list(range(len(batch.rollouts)))]
    steps = []
    for _ in range(epochs):
        order = _shuffled(groups, generator)
        for start in range(0, len(order), per_step):
            steps.append([i for g in order[start:start + per_step] for i in g])
    return steps


def _shuffled(groups: list[list[int]], generator: torch.Generator) -> list[list[int]]:
    return [groups[j] for j in torch.randperm(len(groups), generator=generator).tolist()]


def select_rows(tensors: dict[str, torch.Tensor], rows: list[int]) -> dict[str, torch.Tensor]:
    """The given rows, with the sequence dimension trimmed to their own longest sequence."""
    index = torch.tensor(rows, dtype=torch.long)
    picked = {k: v.index_select(0, index) for k, v in tensors.items()}
    # the last position that holds a token: loss_mask ends one before the last response token
    used = int((picked["loss_mask"].sum(0) > 0).nonzero().max()) + 2 if picked["loss_mask"].any() else 1
    seq = min(-(-used // PAD_TO_MULTIPLE) * PAD_TO_MULTIPLE, picked["input_ids"].shape[1])
    return {k: v[:, :seq].contiguous() for k, v in picked.items()}


def train_tokens(loss_mask: torch.Tensor, steps: list[list[int]]) -> int:
    """Tokens the policy trains on over all mini-batch steps: each row up to the token its last
    loss position predicts (what sequence packing keeps; padding excluded), once per step that
    holds the row."""
    from skyrl_mtp.workers.packing import sequence_lengths

    lengths = sequence_lengths(loss_mask)
    return sum(lengths[row] for rows in steps for row in rows)
