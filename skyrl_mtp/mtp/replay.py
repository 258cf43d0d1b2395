"""Hidden capture and replay: run the MTP head on the *detached* trunk, for every MTP depth.

During the policy forward, :class:`MtpCapture` records what Megatron's MTP block would have
received (the trunk's rotary embedding via a forward hook; hidden states, ids, positions, mask
and packing metadata from the output processor). :func:`replay_mtp` then runs the separately
built ``MultiTokenPredictionBlock`` on ``hidden.detach()`` with a detached re-embedding of the
shifted ids, so the draft loss's gradient reaches only the head (plus, if asked, the shared
embedding). The policy's autograd graph is untouched: its update is what it would be without MTP.

Output: one ``[s, b, h]`` tensor per depth; depth k at position t is the head's hidden state for
predicting token t + k + 1 (Megatron's convention: the head input at t is the trunk hidden at t
and the embedding of token t + k).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class MtpCapture:
    """What the MTP block needs, recorded during one policy forward."""

    rotary_pos_emb: torch.Tensor | None = None
    _hook: object = field(default=None, repr=False)
    _rotary: object = field(default=None, repr=False)
    _rotary_call: tuple = field(default=(), repr=False)

    def attach(self, trunk: torch.nn.Module) -> "MtpCapture":
        """Hooks the trunk's rotary module; call once per trunk."""
        rotary = getattr(trunk, "rotary_pos_emb", None)
        if rotary is None:
            raise ValueError("trunk has no rotary_pos_emb module: MTP replay supports RoPE models only")

        def record(_module, args, kwargs, output):
            self.rotary_pos_emb = output[0] if isinstance(output, tuple) else output
            self._rotary_call = (args, kwargs)

        self._rotary = rotary
        self._hook = rotary.register_forward_hook(record, with_kwargs=True)
        return self

    def rotary_at_offset(self, offset: int) -> torch.Tensor:
        """The rotary table of the last forward with every position moved ``offset`` ahead (per
        sequence when packed): vLLM's drafter runs draft step d at position t + d - 1."""
        args, kwargs = self._rotary_call
        if not args or "offset" in kwargs or not isinstance(args[0], int):
            raise ValueError(f"cannot move the rotary positions of a {type(self._rotary).__name__} called with "
                             f"{args!r}, {kwargs!r}: set trainer.mtp.depth_attention=causal")
        out = self._rotary.forward(args[0], offset, *args[1:], **kwargs)  # .forward: not through the hook
        return out[0] if isinstance(out, tuple) else out

    def detach_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


class _HeadEmbedding:
    """The trunk's embedding as the MTP layer calls it: optionally cut from the autograd graph,
    optionally with the first position of every sequence zeroed (vLLM's MiMo drafter does that:
    it masks the token embedding where the hidden state's position is 0)."""

    def __init__(self, embedding: torch.nn.Module, detach: bool, zero_starts: torch.Tensor | None):
        self.embedding, self.detach, self.zero_starts = embedding, detach, zero_starts

    def __call__(self, input_ids, position_ids):
        out = self.embedding(input_ids=input_ids, position_ids=position_ids)  # [s, b, h]
        if self.detach:
            out = out.detach()
        if self.zero_starts is not None:
            keep = torch.ones(out.shape[0], 1, 1, dtype=out.dtype, device=out.device)
            keep[self.zero_starts] = 0
            out = out * keep
        return out


def sequence_starts(packed_seq_params=None) -> torch.Tensor:
    """Indices along the sequence dim where a sequence begins (0, or every packed segment start)."""
    if packed_seq_params is None:
        return torch.tensor([0])
    from skyrl_mtp.megatron.packed_attention import sequence_bounds

    return torch.tensor(sequence_bounds(packed_seq_params)[:-1], dtype=torch.long)


DEPTH_ATTENTION = ("causal", "drafter_cache")


def replay_mtp(mtp_block: torch.nn.Module, embedding: torch.nn.Module, *, hidden_states: torch.Tensor,
               input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor | None,
               rotary_pos_emb: torch.Tensor | None, packed_seq_params=None, num_depths: int | None = None,
               detach_trunk: bool = True, detach_embedding: bool = True,
               zero_first_embedding: bool = False, depth_attention: str = "causal",
               capture: MtpCapture | None = None) -> list[torch.Tensor]:
    """Runs the MTP head on the (detached) trunk hidden states; returns ``[s, b, h]`` per depth.

    Depth d uses MTP layer d when the block has that many layers, else reuses the last one on its
    own output, as vLLM does for num_speculative_tokens > num_mtp_layers. With the block's own
    depth this is exactly ``MultiTokenPredictionBlock.forward`` (tested against it).
    ``zero_first_embedding`` reproduces vLLM's MiMo drafter at depth 1 (see _HeadEmbedding).

    ``depth_attention``: ``causal`` runs each depth as a causal pass over that depth's states (the
    native block's semantics); ``drafter_cache`` runs depths >= 2 as vLLM's drafter does, at
    position t + d - 1 attending to the depth-1 states of positions <= t and to its own chain
    (skyrl_mtp.megatron.drafter_attention; needs ``capture`` for the moved rotary positions).
    """
    if depth_attention not in DEPTH_ATTENTION:
        raise ValueError(f"depth_attention={depth_attention!r}: use one of {list(DEPTH_ATTENTION)}")
    layers = mtp_block.layers
    num_depths = num_depths or len(layers)
    chain = None
    if depth_attention == "drafter_cache" and num_depths > 1:
        from skyrl_mtp.megatron.drafter_attention import DraftChain, install

        if capture is None:
            raise ValueError("depth_attention='drafter_cache' needs the MtpCapture (for the moved rotary positions)")
        if len(layers) > 1:  # vLLM's proposer runs the first MTP layer at every draft step
            raise ValueError(f"depth_attention='drafter_cache' models vLLM drafting with one MTP layer; this head "
                             f"has {len(layers)}: set trainer.mtp.depth_attention=causal")
        install(layers[0])
        chain = DraftChain()
    hidden = hidden_states.detach() if detach_trunk else hidden_states
    outputs = []
    for depth in range(num_depths):
        zero = sequence_starts(packed_seq_params) if (zero_first_embedding and depth == 0) else None
        layer = layers[min(depth, len(layers) - 1)]
        rotary = rotary_pos_emb if chain is None or depth == 0 else capture.rotary_at_offset(depth)
        # megatron-core 0.16 returns (hidden, ids, positions); >= 0.19 adds the rolled padding mask.
        hidden, input_ids, position_ids, *_ = layer(
            input_ids=input_ids,
            position_ids=position_ids,
            hidden_states=hidden,
            attention_mask=attention_mask,
            rotary_pos_emb=rotary,
            attention_bias=chain,
            packed_seq_params=packed_seq_params,
            embedding=_HeadEmbedding(embedding, detach_embedding, zero),
        )
        outputs.append(hidden)
        if chain is not None and depth + 1 < num_depths:
            chain = chain.next_depth()
    return outputs


def mtp_logits(output_layer: torch.nn.Module, hidden: torch.Tensor, output_weight: torch.Tensor | None = None,
               *, detach_output: bool = True) -> torch.Tensor:
    """Output adapter: MTP hidden ``[s, b, h]`` -> vocab-parallel logits ``[b, s, V_local]``.

    Uses the trunk's (tied or untied) output layer. With detach_output the layer's weight is
    detached, so the draft loss does not train the shared output layer (the policy's).
    """
    weight = output_weight if output_weight is not None else output_layer.weight
    if detach_output:
        weight = weight.detach()
    logits, _ = output_layer(hidden, weight=weight, runtime_gather_output=False)
    return logits.transpose(0, 1)
