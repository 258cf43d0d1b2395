"""Sequence packing for the policy: a right-padded batch -> micro-batches of whole sequences
back to back, each at most ``megatron.max_tokens_per_microbatch`` tokens, and the way back.

A packed micro-batch is a dict like an unpadded one, with every per-token tensor ``[1, T]``
(the sequences' tokens concatenated) and a :class:`Packing` under ``"packing"`` that knows which
batch row each sequence came from, its length and Megatron's ``PackedSeqParams``. The model runs
on the packed row; the RL math, which reduces per sequence (sequence-mean losses, GSPO,
sequence-level TIS), sees the sequences as rows again (:meth:`Packing.as_rows`), so it is the
padded path's math on the same numbers.

A sequence's length is what can count: up to its last loss position + 1 (the token that
position predicts). Tokens after that only ever follow, so under causal attention no loss
or log-prob that counts can see them; leaving them out changes nothing but the work.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from skyrl_mtp.megatron.packed_attention import packed_seq_params


@dataclass
class Packing:
    """The sequences of one packed micro-batch: batch rows, lengths, and Megatron's PackedSeqParams."""

    rows: list[int]  # row of the padded batch each sequence came from, in packed order
    lengths: list[int]
    device: torch.device
    params: object = field(init=False)  # PackedSeqParams (cu_seqlens on the device)
    _index: torch.Tensor = field(init=False, repr=False)  # [n, longest] packed position of row token
    _valid: torch.Tensor = field(init=False, repr=False)  # [n, longest] the row has a token there

    def __post_init__(self):
        self.params = packed_seq_params(self.lengths, self.device)
        starts = self.params.cu_seqlens_q[:-1].long()
        offsets = torch.arange(max(self.lengths), device=self.device)
        self._valid = offsets[None] < torch.tensor(self.lengths, device=self.device)[:, None]
        self._index = torch.where(self._valid, starts[:, None] + offsets[None], torch.zeros_like(offsets[None]))

    @property
    def total(self) -> int:
        return sum(self.lengths)

    def position_ids(self) -> torch.Tensor:
        """``[1, T]``: positions restarting at 0 for every sequence."""
        return torch.cat([torch.arange(n, device=self.device) for n in self.lengths])[None]

    def targets(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[1, T]``: the token each position predicts, within its own sequence (0 at a
        sequence's last position, as past the end of a padded row's tokens nothing counts)."""
        out = torch.cat([input_ids[:, 1:], torch.zeros_like(input_ids[:, :1])], dim=1)
        out[:, self.params.cu_seqlens_q[1:].long() - 1] = 0
        return out

    def as_rows(self, packed: torch.Tensor) -> torch.Tensor:
        """``[1, T]`` -> ``[n, longest]``, one row per sequence, right-padded with 0 (differentiable)."""
        index, valid = self._index.to(packed.device), self._valid.to(packed.device)  # e.g. log-probs sent to the host
        rows = packed[0][index]
        return torch.where(valid, rows, torch.zeros_like(rows))

    def scatter(self, packed: torch.Tensor, out: torch.Tensor) -> None:
        """Writes each sequence's values of ``packed [1, T]`` into its row of the padded ``out [B, S]``."""
        rows = self.as_rows(packed.to(out.device))
        for i, (row, n) in enumerate(zip(self.rows, self.lengths)):
            out[row, :n] = rows[i, :n]


def sequence_lengths(loss_mask: torch.Tensor) -> list[int]:
    """Per row of ``loss_mask [B, S]``: the tokens that can count (last loss position + 2), and 1
    for a row without loss tokens (nothing of it counts; it keeps its row in the log-probs)."""
    positions = torch.arange(loss_mask.shape[1], device=loss_mask.device)
    last = torch.where(loss_mask > 0, positions, torch.full_like(positions, -1)).amax(dim=1)
    return [int(n) for n in torch.where(last >= 0, (last + 2).clamp(max=loss_mask.shape[1]), torch.ones_like(last))]


def plan_microbatches(lengths: list[int], budget: int) -> list[list[int]]:
    """First-fit decreasing: the rows of each micro-batch (ascending), none over ``budget`` tokens."""
    too_long = [(i, n) for i, n in enumerate(lengths) if n > budget]
    if too_long:
        row, n = too_long[0]
        raise ValueError(f"sequence {row} has {n} tokens, more than megatron.max_tokens_per_microbatch={budget}: "
                         f"set it >= {max(n for _, n in too_long)} (a sequence is never split)")
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):  # stable: ties keep row order
        slot = next((b for b, free in enumerate(room) if free >= lengths[i]), None)
        if slot is None:
            bins.append([])
            room.append(budget)
            slot = len(bins) - 1
        bins[slot].append(i)
        room[slot] -= lengths[i]
    return [sorted(b) for b in bins]


def pack_microbatches(batch: dict[str, torch.Tensor], budget: int,
                      device: torch.device | str) -> list[dict[str, object]]:
    """The batch's ``[B, S]`` tensors as packed micro-batches on ``device`` (see module docstring)."""
    shape = batch["input_ids"].shape
    for key, value in batch.items():
        if not torch.is_tensor(value) or value.shape != shape:
            raise ValueError(f"packing takes per-token [B, S] = {tuple(shape)} tensors; {key!r} is "
                             f"{tuple(value.shape) if torch.is_tensor(value) else type(value).__name__}")
    lengths = sequence_lengths(batch["loss_mask"])
    out = []
    for rows in plan_microbatches(lengths, budget):
        mb: dict[str, object] = {key: torch.cat([value[r, :lengths[r]] for r in rows])[None].to(device)
                                 for key, value in batch.items()}
        mb["packing"] = Packing(rows=rows, lengths=[lengths[r] for r in rows], device=torch.device(device))
        out.append(mb)
    return out
