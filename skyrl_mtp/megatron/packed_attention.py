"""Packed sequences in Megatron (the THD format): what a packed micro-batch hands the model, and
the local layer spec's attention made to keep each sequence to itself.

A packed micro-batch is one row ``[1, T]`` holding several sequences back to back;
``cu_seqlens = [0, l0, l0 + l1, ..., T]`` marks where each begins. Megatron carries this as
``PackedSeqParams(qkv_format="thd")``, and with it RoPE restarts at every sequence (rope_utils'
THD path), the MTP head's roll stays inside each sequence (``roll_tensor``'s packed path), and
TransformerEngine's attention (the TE layer spec, on GPUs) attends within each sequence only.

Megatron's local ``DotProductAttention`` (the layer spec without TE: CPU, or GPUs without TE)
refuses packed input. :class:`PackedDotProductAttention` takes it: the same attention math run on
each sequence of the pack with its own causal mask, so the scores cost ``sum(l_i^2)`` per head,
what the padded rows would, rather than ``T^2`` for the whole pack (a dense block-diagonal mask
over the pack made packing slower than padding on CPU: 0.82x train tokens/s in
``scripts/bench_packing.py``). On GPUs the varlen kernel is TE's.
"""

from __future__ import annotations

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.dot_product_attention import DotProductAttention

from skyrl_mtp.megatron.model_builder import causal_mask


_HOST_BOUNDS = "_skyrl_host_bounds"


def packed_seq_params(lengths: list[int], device: torch.device | str) -> PackedSeqParams:
    """Megatron's description of sequences of these lengths packed back to back (no padding
    between them; TE reads int32 boundaries)."""
    if not lengths or min(lengths) < 1:
        raise ValueError(f"packed sequences need lengths >= 1, got {lengths}")
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int32), 0)
    bounds = cu.tolist()
    cu = cu.to(device)
    longest = max(lengths)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest,
                             max_seqlen_kv=longest)
    setattr(params, _HOST_BOUNDS, bounds)
    return params


def sequence_bounds(params: PackedSeqParams) -> list[int]:
    """``cu_seqlens`` as a host list. Kept on the params object, so the per-layer attention of a
    packed micro-batch does not read the GPU tensor back (a device sync) once per layer."""
    bounds = getattr(params, _HOST_BOUNDS, None)
    if bounds is None:
        bounds = params.cu_seqlens_q.tolist()
        setattr(params, _HOST_BOUNDS, bounds)
    return bounds


class PackedDotProductAttention(DotProductAttention):
    """Megatron's local core attention, also for packed (THD) input.

    Packed, Megatron's attention module hands the core attention ``[t, heads, dim]`` tensors
    (the batch dim of 1 squeezed out) and wants ``[t, 1, heads * dim]`` back; this runs the
    unchanged dense path on each sequence ``[cu[i], cu[i + 1])`` with a causal mask and
    concatenates the results. Unpacked input goes to DotProductAttention as is.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # The fused causal softmax kernel (where it is compiled) applies its own triangular mask
        # and ignores the one passed in, which would let sequences attend to earlier ones.
        self.scale_mask_softmax.scaled_masked_softmax_fusion = False

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params: PackedSeqParams | None = None):
        if packed_seq_params is None:
            return super().forward(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                                   attention_bias=attention_bias)
        if packed_seq_params.qkv_format != "thd":
            raise ValueError(f"PackedDotProductAttention takes qkv_format='thd', got {packed_seq_params.qkv_format!r}")
        cu_q, cu_kv = packed_seq_params.cu_seqlens_q, packed_seq_params.cu_seqlens_kv
        if cu_q is not cu_kv and not torch.equal(cu_q, cu_kv):  # `is`: no device read per layer
            raise ValueError("PackedDotProductAttention is self-attention: cu_seqlens_q must equal cu_seqlens_kv")
        bounds = sequence_bounds(packed_seq_params)
        if bounds[-1] != query.shape[0]:
            raise ValueError(f"cu_seqlens cover {bounds[-1]} tokens, the packed input has {query.shape[0]}")
        outputs = []
        for start, end in zip(bounds[:-1], bounds[1:]):
            if end == start:
                continue
            outputs.append(super().forward(query[start:end].unsqueeze(1), key[start:end].unsqueeze(1),
                                           value[start:end].unsqueeze(1), causal_mask(end - start, query.device),
                                           attn_mask_type=attn_mask_type, attention_bias=attention_bias))
        return torch.cat(outputs, dim=0)


def with_packed_attention(layer_spec):
    """The local layer spec (a fresh ModuleSpec of a TransformerLayer) with its core attention
    replaced by :class:`PackedDotProductAttention`; the MTP head's layers are built from the same spec."""
    attention = layer_spec.submodules.self_attention.submodules
    if attention.core_attention is not DotProductAttention:
        raise ValueError(f"packed sequences on the local layer spec expect DotProductAttention, found "
                         f"{attention.core_attention!r}")
    attention.core_attention = PackedDotProductAttention
    return layer_spec
