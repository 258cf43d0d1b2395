"""Vocabulary-parallel primitives, one convention for the policy and the draft losses: which
columns this rank owns, the few collectives that turn per-shard softmax statistics into global
ones, and the policy's token log-probabilities built on them (:func:`token_logprobs_and_entropy`).

Rank ``r`` of a tensor-parallel group of size ``tp`` holds the contiguous columns
``[r * local_size, (r + 1) * local_size)`` of a vocabulary padded to ``local_size * tp``.
Columns at or beyond the true ``vocab_size`` are padding: they are sliced away before any
softmax, top-k or gather, so a rank may own no valid column at all. Such a rank still takes
part in every collective (with neutral values: max ``-inf``, sum ``0``), in the same order as
every other rank, so no collective ever waits on a rank that skipped it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class VocabShard:
    """This rank's slice of a (possibly padded) vocabulary and the group it is sharded over."""

    group: dist.ProcessGroup | None
    rank: int
    size: int
    local_size: int
    vocab_size: int

    @property
    def offset(self) -> int:
        """Global id of this rank's first column."""
        return self.rank * self.local_size

    @property
    def num_valid(self) -> int:
        """How many of this rank's columns are real tokens (the rest is padding)."""
        return min(max(self.vocab_size - self.offset, 0), self.local_size)


def group_rank_and_size(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(rank, world size) within `group`; (0, 1) when there is no tensor parallelism."""
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def all_reduce_max(tensor: Tensor, shard: VocabShard) -> Tensor:
    """Element-wise max over the group, in place."""
    if shard.size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=shard.group)
    return tensor


def all_reduce_sum(tensor: Tensor, shard: VocabShard) -> Tensor:
    """Element-wise sum over the group, in place."""
    if shard.size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=shard.group)
    return tensor


def all_gather_last_dim(tensor: Tensor, shard: VocabShard) -> Tensor:
    """Concatenate every rank's `tensor` along the last dimension, in rank order."""
    if shard.size == 1:
        return tensor
    tensor = tensor.contiguous()
    parts = [torch.empty_like(tensor) for _ in range(shard.size)]
    dist.all_gather(parts, tensor, group=shard.group)
    return torch.cat(parts, dim=-1)


def local_max_and_sumexp(x: Tensor) -> tuple[Tensor, Tensor]:
    """Max over the last dim and ``sum(exp(x - max))``; ``(-inf, 0)`` for an empty (all-padding) shard."""
    if x.shape[-1] == 0:
        return x.new_full(x.shape[:-1], -math.inf), x.new_zeros(x.shape[:-1])
    local_max = x.amax(dim=-1)
    return local_max, torch.exp(x - local_max.unsqueeze(-1)).sum(dim=-1)


def rebase(local_sum: Tensor, local_max: Tensor, global_max: Tensor) -> Tensor:
    """Re-express a sum taken relative to `local_max` relative to `global_max`.

    An empty shard has ``local_max = -inf`` and ``local_sum = 0``, which maps to 0 as wanted.
    """
    return local_sum * torch.exp(local_max - global_max)


def owned_local_index(global_ids: Tensor, shard: VocabShard) -> tuple[Tensor, Tensor]:
    """(local column index, owned) for global token ids.

    ``owned`` is True where the id is a valid column of this shard; elsewhere the index is
    clamped into range so it can be used with gather/scatter and then masked out.
    """
    local = global_ids - shard.offset
    owned = (local >= 0) & (local < shard.num_valid)
    return local.clamp(0, max(shard.num_valid - 1, 0)), owned


def _sum_with_grad(tensor: Tensor, shard: VocabShard) -> Tensor:
    """Sum over the group with the exact gradient of a sum over shards (Megatron's forward
    all-reduce, backward identity)."""
    if shard.size == 1:
        return tensor
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    return reduce_from_tensor_model_parallel_region(tensor, group=shard.group)


def token_logprobs_and_entropy(logits_local: Tensor, targets: Tensor, *, vocab_size: int,
                               temperature: float = 1.0, tp_group=None, with_entropy: bool = True):
    """log softmax(logits / T)[target] per position ``[b, s]`` (with grad), and the entropy of
    softmax(logits / T) per position (no grad; a metric), over the true vocabulary only."""
    rank, size = group_rank_and_size(tp_group)
    shard = VocabShard(group=tp_group, rank=rank, size=size, local_size=logits_local.shape[-1],
                       vocab_size=vocab_size)
    valid = torch.arange(shard.local_size, device=logits_local.device) < shard.num_valid
    # Each [tokens, vocab] fp32 temporary is 2.5 GB at 4096 tokens x 152K vocab, so the chain works
    # in place on one private copy (none of these in-place ops needs its input for backward);
    # only ``exp`` is kept for backward. The copy matters: the caller's logits are the draft
    # loss's teacher too.
    x = logits_local.to(torch.float32, copy=True)
    if temperature != 1.0:
        x.div_(temperature)
    x.masked_fill_(~valid, float("-inf"))
    # A shard that is all padding has max -inf: use a finite stand-in so exp() stays 0, not nan.
    global_max = all_reduce_max(x.detach().amax(dim=-1).clamp_min(torch.finfo(x.dtype).min), shard)
    shifted = x.sub_(global_max.unsqueeze(-1))
    exp = shifted.exp()
    sum_exp = _sum_with_grad(exp.sum(dim=-1), shard)
    local_target, owned = owned_local_index(targets, shard)
    picked = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)
    logprobs = _sum_with_grad(torch.where(owned, picked, torch.zeros_like(picked)), shard) - sum_exp.log()
    entropy = None
    if with_entropy:
        with torch.no_grad():
            # padded columns: exp = 0 and shifted = -inf, whose product is nan, hence the fill
            weighted = all_reduce_sum((exp * shifted).masked_fill_(~valid, 0.0).sum(-1), shard)
            entropy = sum_exp.log() - weighted / sum_exp
    return logprobs, entropy
