"""The MTP head's attention at draft depth >= 2 as vLLM's drafter runs it, for the head's replay.

vLLM drafts k tokens with one MTP layer (``spec_decode/llm_base_proposer.py``): the first draft
step runs the layer over the context, one depth-1 state per position, and writes their keys and
values to the drafter's KV cache; every later step runs one query per request at the next
position, attending to that cache plus the entries its own earlier steps wrote. So the depth-d
draft from base position i (d >= 2) sits at position i + d - 1 and attends to

    the depth-1 keys / values of positions 0..i   and   the depth-2..d entries of its own chain,

not to depth-d states of earlier positions, which is what a plain causal replay of the layer on
its own output gives it (``trainer.mtp.depth_attention=causal``).

:func:`install` overrides one MTP layer's core-attention ``forward`` on the instance (parameter and
state-dict names stay as they are). Called with a :class:`DraftChain` as ``attention_bias`` (the
argument Megatron's ``SelfAttention`` hands through to its core attention, also under selective
recompute, whose closure keeps it), the core attention records this depth's keys and values in the
chain and, from depth 2, computes the attention above; otherwise it runs the original. The cache
and the chain's earlier entries are detached: the depth-d loss trains the head through the query
and its own key and value, with what earlier depths wrote held fixed (their own losses train it).

Math: torch's ``scaled_dot_product_attention`` over the depth-1 keys and the chain's keys side by
side, with a mask that lets each query read the cache causally and its own chain's entries only
(:func:`drafter_attention`); packed (THD) input runs it per sequence. It stands in for TE's kernels
at depths >= 2; the keys it reads are (1 + chain length) x the sequence, mostly masked.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from skyrl_mtp.megatron.model_builder import causal_mask
from skyrl_mtp.megatron.packed_attention import sequence_bounds

_ORIGINAL = "_skyrl_original_forward"


@dataclass
class DraftChain:
    """What one depth's core attention reads (the depth-1 cache and the chain's earlier entries,
    all ``[s, b, groups, dim]`` or ``[t, groups, dim]`` packed) and leaves (its own key, value)."""

    cache: tuple[torch.Tensor, torch.Tensor] | None = None  # None: this is depth 1
    chain: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    recorded: tuple[torch.Tensor, torch.Tensor] | None = None

    def next_depth(self) -> "DraftChain":
        """The chain for the following depth, once this depth's layer has run."""
        if self.recorded is None:
            raise RuntimeError("the MTP layer did not run its drafter attention: was install() called on it?")
        if self.cache is None:
            return DraftChain(cache=self.recorded)
        return DraftChain(cache=self.cache, chain=[*self.chain, self.recorded])


def core_attention_of(mtp_layer: torch.nn.Module) -> torch.nn.Module:
    """The core attention module of a Megatron MTP layer (its transformer layer's self-attention;
    the layer is ``transformer_layer`` in megatron-core 0.16, ``mtp_model_layer`` from 0.17)."""
    from skyrl_mtp.megatron.bridge import mtp_submodule_name

    try:
        return getattr(mtp_layer, mtp_submodule_name()).self_attention.core_attention
    except AttributeError as err:
        raise ValueError(f"trainer.mtp.depth_attention=drafter_cache needs an MTP layer with a self-attention "
                         f"core attention; {type(mtp_layer).__name__} has none ({err}): set "
                         f"trainer.mtp.depth_attention=causal") from err


def install(mtp_layer: torch.nn.Module) -> None:
    """Makes the layer's core attention take a :class:`DraftChain` (idempotent)."""
    core = core_attention_of(mtp_layer)
    if hasattr(core, _ORIGINAL):
        return
    dropout = getattr(core, "attention_dropout", 0.0)
    dropout = getattr(dropout, "p", dropout)
    if dropout:
        raise ValueError(f"trainer.mtp.depth_attention=drafter_cache has no attention dropout, and the head's is "
                         f"{dropout}: set the model's attention_dropout to 0 or depth_attention=causal")
    setattr(core, _ORIGINAL, core.forward)
    core.forward = types.MethodType(_forward, core)


def _forward(core, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
             packed_seq_params=None):
    original = getattr(core, _ORIGINAL)
    chain = attention_bias
    if not isinstance(chain, DraftChain):
        return original(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                        attention_bias=attention_bias, packed_seq_params=packed_seq_params)
    chain.recorded = (key.detach(), value.detach())
    if chain.cache is None:  # depth 1: the plain causal attention; its keys / values become the cache
        return original(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                        packed_seq_params=packed_seq_params)
    scale = getattr(core, "softmax_scale", None) or query.shape[-1] ** -0.5
    cache_k, cache_v = chain.cache
    chain_k = [k for k, _ in chain.chain] + [key]
    chain_v = [v for _, v in chain.chain] + [value]
    if packed_seq_params is None:
        if attention_mask is None:
            attention_mask = causal_mask(query.shape[0], query.device)
        return drafter_attention(query, cache_k, cache_v, chain_k, chain_v, attention_mask, scale)
    bounds = sequence_bounds(packed_seq_params)
    outputs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        part = slice(start, end)
        outputs.append(drafter_attention(
            query[part].unsqueeze(1), cache_k[part].unsqueeze(1), cache_v[part].unsqueeze(1),
            [k[part].unsqueeze(1) for k in chain_k], [v[part].unsqueeze(1) for v in chain_v],
            causal_mask(end - start, query.device), scale))
    return torch.cat(outputs, dim=0)


def drafter_attention(query: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
                      chain_k: list[torch.Tensor], chain_v: list[torch.Tensor], mask: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """``query`` ``[s, b, heads, dim]`` at depth d; the depth-1 ``cache_k`` / ``cache_v`` and the
    chain's entries for depths 2..d ``[s, b, groups, dim]`` (entry e at row i: depth e of base i);
    ``mask`` ``[b or 1, 1, s, s]``, True where the depth-1 key may not be read (the causal mask).
    Returns ``[s, b, heads * dim]``.

    One ``scaled_dot_product_attention`` over the keys ``[cache | chain_2 | ... | chain_d]`` (s each)
    with a mask that lets row i read the cache causally and only row i of every chain block, so
    on GPUs it takes a fused memory-efficient kernel (no ``[s, s]`` scores kept for backward).
    """
    s, b, heads, dim = query.shape
    keys = torch.cat([cache_k, *chain_k], dim=0).permute(1, 2, 0, 3)  # [b, groups, s * (1 + m), dim]
    values = torch.cat([cache_v, *chain_v], dim=0).permute(1, 2, 0, 3)
    own = torch.eye(s, dtype=torch.bool, device=query.device).expand(*mask.shape[:2], s, s)
    allowed = torch.cat([~mask, *([own] * len(chain_k))], dim=-1)  # True: may be read
    out = F.scaled_dot_product_attention(query.permute(1, 2, 0, 3), keys.to(query.dtype), values.to(query.dtype),
                                         attn_mask=allowed, scale=scale, enable_gqa=heads != keys.shape[1])
    return out.permute(2, 0, 1, 3).reshape(s, b, heads * dim)
