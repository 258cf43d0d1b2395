"""Token log-probabilities and entropy from vocab-parallel logits (each TP rank holds a contiguous
vocab shard), at a sampling temperature, with padded vocab columns excluded.

Differentiable: the cross-rank sums use Megatron's ``reduce_from_tensor_model_parallel_region``
(forward all-reduce, backward identity), which is the exact gradient of a sum over shards.
"""

from __future__ import annotations

import torch


def _tp_reduce(x: torch.Tensor, tp_group, op=None) -> torch.Tensor:
    if tp_group is None or torch.distributed.get_world_size(tp_group) == 1:
        return x
    if op is not None:  # non-differentiable reductions (max)
        torch.distributed.all_reduce(x, op=op, group=tp_group)
        return x
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    return reduce_from_tensor_model_parallel_region(x, group=tp_group)


def _shard(logits_local: torch.Tensor, vocab_size: int, tp_group) -> tuple[int, torch.Tensor]:
    rank = 0 if tp_group is None else torch.distributed.get_rank(tp_group)
    width = logits_local.shape[-1]
    offset = rank * width
    valid = (torch.arange(width, device=logits_local.device) + offset) < vocab_size
    return offset, valid


def token_logprobs_and_entropy(logits_local: torch.Tensor, targets: torch.Tensor, *, vocab_size: int,
                               temperature: float = 1.0, tp_group=None, with_entropy: bool = True):
    """log softmax(logits / T)[target] per position ``[b, s]`` (with grad), and the entropy of
    softmax(logits / T) per position (no grad; a metric), over the true vocabulary only."""
    offset, valid = _shard(logits_local, vocab_size, tp_group)
    # Each [tokens, vocab] fp32 temporary is 2.5 GB at 4096 tokens x 152K vocab, so the chain works
    # in place on one private copy (none of these in-place ops needs its input for backward);
    # only ``exp`` is kept for backward. The copy matters: the caller's logits are the draft
    # loss's teacher too.
    x = logits_local.to(torch.float32, copy=True)
    if temperature != 1.0:
        x.div_(temperature)
    x.masked_fill_(~valid, float("-inf"))
    local_max = x.detach().max(dim=-1).values
    # A shard that is all padding has max -inf: use a finite stand-in so exp() stays 0, not nan.
    global_max = _tp_reduce(local_max.clamp_min(torch.finfo(x.dtype).min), tp_group, torch.distributed.ReduceOp.MAX)
    shifted = x.sub_(global_max.unsqueeze(-1))
    exp = shifted.exp()
    sum_exp = _tp_reduce(exp.sum(dim=-1), tp_group)
    local_target = targets - offset
    in_shard = (local_target >= 0) & (local_target < x.shape[-1])
    picked = shifted.gather(-1, local_target.clamp(0, x.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
    target_shifted = _tp_reduce(torch.where(in_shard, picked, torch.zeros_like(picked)), tp_group)
    logprobs = target_shifted - sum_exp.log()
    entropy = None
    if with_entropy:
        with torch.no_grad():
            # padded columns: exp = 0 and shifted = -inf, whose product is nan, hence the fill
            weighted = _tp_reduce((exp * shifted).masked_fill_(~valid, 0.0).sum(-1), tp_group)
            entropy = sum_exp.log() - weighted / sum_exp
    return logprobs, entropy
