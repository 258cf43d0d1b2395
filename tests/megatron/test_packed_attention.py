"""Packed sequences (THD) through Megatron on the local layer spec: a packed trunk + MTP head
against the float64 MiMo reference run on each sequence alone."""

from __future__ import annotations

import torch

from skyrl_mtp.megatron.bridge import load_module_state, make_bridge, mtp_submodule_name, split_trunk_and_mtp
from skyrl_mtp.megatron.model_builder import BuildOptions, build_mtp_block, build_trunk, causal_mask
from skyrl_mtp.megatron.packed_attention import PackedDotProductAttention, packed_seq_params
from skyrl_mtp.models.checkpoint import random_hf_state_dict
from skyrl_mtp.models.mimo import get_preset
from skyrl_mtp.mtp.replay import MtpCapture, mtp_logits, replay_mtp

from tests.megatron.test_model_parity import reference_mimo

LENGTHS = [5, 9, 3, 7]
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _models(cfg, hf, packed: bool):
    trunk_state, head_state = split_trunk_and_mtp(make_bridge(cfg).hf_to_megatron(hf))
    opts = BuildOptions(packed=packed)
    trunk, head = build_trunk(cfg, opts), build_mtp_block(cfg, opts)
    load_module_state(trunk, trunk_state, what="trunk")
    load_module_state(head, head_state, what="mtp head")
    return trunk.eval(), head.eval()


def _run(trunk, head, ids, pos, mask, params):
    """Trunk logits and the head's depth-1 logits (first position of each sequence zeroed, as vLLM)."""
    capture = MtpCapture().attach(trunk)

    def processor(**kw):
        hidden = replay_mtp(head, trunk.embedding, hidden_states=kw["hidden_states"], input_ids=kw["input_ids"],
                            position_ids=kw["position_ids"], attention_mask=kw["attention_mask"],
                            rotary_pos_emb=capture.rotary_pos_emb, packed_seq_params=kw["packed_seq_params"],
                            zero_first_embedding=True)
        logits, _ = kw["output_layer"](kw["hidden_states"], weight=kw["output_weight"])
        return logits.transpose(0, 1), mtp_logits(kw["output_layer"], hidden[0], kw["output_weight"])

    with torch.no_grad():
        out = trunk(ids.to(DEVICE), pos.to(DEVICE), None if mask is None else mask.to(DEVICE), packed_seq_params=params,
                    output_processor=processor, output_processor_context=None)
    capture.detach_hook()
    return tuple(t.double().cpu() for t in out)


def test_packed_trunk_and_head_equal_each_sequence_alone(megatron_single):
    """Four sequences packed into one row: trunk logits and MTP depth-1 logits of each sequence equal
    the float64 reference run on that sequence alone (so attention, RoPE, the head's roll and the
    zeroed first embedding all restart at each boundary). Control: the same row as one long
    sequence (plain causal mask) does not."""
    cfg = get_preset("tiny").replace(init_std=0.2)  # larger weights: a sharper test
    hf = random_hf_state_dict(cfg, seed=3)
    seqs = [torch.randint(4, cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(i))
            for i, n in enumerate(LENGTHS)]
    ids = torch.cat(seqs)[None]
    pos = torch.cat([torch.arange(n) for n in LENGTHS])[None]
    params = packed_seq_params(LENGTHS, DEVICE)

    trunk, head = _models(cfg, hf, packed=True)
    assert isinstance(trunk.decoder.layers[0].self_attention.core_attention, PackedDotProductAttention)
    mtp_decoder_layer = getattr(head.layers[0], mtp_submodule_name())  # named by megatron-core's version
    assert isinstance(mtp_decoder_layer.self_attention.core_attention, PackedDotProductAttention)
    logits, mtp = _run(trunk, head, ids, pos, None, params)
    start = 0
    for seq in seqs:
        n = len(seq)
        want_logits, want_mtp = reference_mimo(hf, cfg, seq[None])
        assert (logits[:, start:start + n, : cfg.vocab_size] - want_logits).abs().max().item() <= 1e-4
        # the sequence's last MTP position has no next token inside it: compare its n-1 real ones
        assert (mtp[:, start:start + n - 1, : cfg.vocab_size] - want_mtp).abs().max().item() <= 1e-4
        start += n

    plain_trunk, plain_head = _models(cfg, hf, packed=False)
    as_one, _ = _run(plain_trunk, plain_head, ids, torch.arange(ids.shape[1])[None], causal_mask(ids.shape[1]), None)
    second = slice(LENGTHS[0], LENGTHS[0] + LENGTHS[1])
    want, _ = reference_mimo(hf, cfg, seqs[1][None])
    assert (as_one[:, second, : cfg.vocab_size] - want).abs().max().item() > 1e-2
