"""HF <-> Megatron bridge: bit-exact round trips, TP shard/gather, and clear errors on bad input."""

from __future__ import annotations

import pytest
import torch

from skyrl_mtp.megatron.bridge import MimoBridge, split_trunk_and_mtp
from skyrl_mtp.models.checkpoint import random_hf_state_dict
from skyrl_mtp.models.mimo import get_preset

SMALL = get_preset("tiny").replace(name="small", vocab_size=300, hidden_size=64, num_layers=2,
                                   num_attention_heads=8, num_query_groups=2, ffn_hidden_size=96,
                                   num_mtp_layers=2)


def _bridge(cfg, *, te=False, sub="transformer_layer", padded=512):
    return MimoBridge(cfg=cfg, padded_vocab=padded, te_names=te, mtp_submodule=sub)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("te", [False, True])
@pytest.mark.parametrize("sub", ["transformer_layer", "mtp_model_layer"])
def test_round_trip_is_bit_exact(tied, te, sub):
    cfg = SMALL.replace(tie_word_embeddings=tied)
    hf = random_hf_state_dict(cfg, seed=3)
    # Make biases and norms non-trivial so a swapped tensor could not go unnoticed.
    hf = {k: (v + torch.randn_like(v)) if v.dim() == 1 else v for k, v in hf.items()}
    bridge = _bridge(cfg, te=te, sub=sub)
    mc = bridge.hf_to_megatron(hf)
    assert ("output_layer.weight" in mc) == (not tied)
    assert any(k.startswith(f"mtp.layers.1.{sub}.") for k in mc)
    assert mc["embedding.word_embeddings.weight"].shape[0] == 512
    back = bridge.megatron_to_hf(mc)
    assert set(back) == set(hf)
    for name, tensor in hf.items():
        assert torch.equal(back[name], tensor), name


def test_layouts_match_megatron_conventions():
    """Independent checks of the three layout rules (not via the inverse function)."""
    cfg = SMALL
    hf = random_hf_state_dict(cfg, seed=4)
    mc = _bridge(cfg).hf_to_megatron(hf)
    h, d = cfg.hidden_size, cfg.head_dim
    per_group = cfg.num_attention_heads // cfg.num_query_groups
    qkv = mc["decoder.layers.1.self_attention.linear_qkv.weight"]
    # group 1 = [q heads 2..3 | k head 1 | v head 1]
    g1 = qkv[(per_group + 2) * d: 2 * (per_group + 2) * d]
    assert torch.equal(g1[: per_group * d], hf["model.layers.1.self_attn.q_proj.weight"][per_group * d: 2 * per_group * d])
    assert torch.equal(g1[per_group * d: (per_group + 1) * d], hf["model.layers.1.self_attn.k_proj.weight"][d: 2 * d])
    assert torch.equal(g1[(per_group + 1) * d:], hf["model.layers.1.self_attn.v_proj.weight"][d: 2 * d])
    fc1 = mc["decoder.layers.0.mlp.linear_fc1.weight"]
    assert torch.equal(fc1[: cfg.ffn_hidden_size], hf["model.layers.0.mlp.gate_proj.weight"])
    eh = mc["mtp.layers.0.eh_proj.weight"]
    proj = hf["model.mtp_layers.0.input_proj.weight"]
    assert torch.equal(eh[:, :h], proj[:, h:])  # Megatron's first half acts on the embedding
    assert torch.equal(mc["mtp.layers.0.enorm.weight"], hf["model.mtp_layers.0.token_layernorm.weight"])


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_shard_then_gather_is_identity(tp):
    cfg = SMALL
    bridge = _bridge(cfg)
    full = bridge.hf_to_megatron(random_hf_state_dict(cfg, seed=5))
    shards = [bridge.shard_for_tp(full, r, tp) for r in range(tp)]
    fc1_r0 = shards[0]["decoder.layers.0.mlp.linear_fc1.weight"]
    f = cfg.ffn_hidden_size // tp
    # rank 0 holds [gate_0; up_0], not the first 2f rows of [gate; up]
    assert torch.equal(fc1_r0[f:], full["decoder.layers.0.mlp.linear_fc1.weight"][cfg.ffn_hidden_size: cfg.ffn_hidden_size + f])
    gathered = bridge.gather_tp(shards)
    assert set(gathered) == set(full)
    for k in full:
        assert torch.equal(gathered[k], full[k]), k


def test_split_trunk_and_mtp():
    cfg = SMALL
    full = _bridge(cfg).hf_to_megatron(random_hf_state_dict(cfg, seed=6))
    trunk, head = split_trunk_and_mtp(full)
    assert not any(k.startswith("mtp.") for k in trunk)
    assert "layers.0.eh_proj.weight" in head and len(trunk) + len(head) == len(full)


def test_missing_tensor_is_named():
    cfg = SMALL
    hf = random_hf_state_dict(cfg, seed=1)
    del hf["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        _bridge(cfg).hf_to_megatron(hf)


def test_misshaped_tensor_is_named():
    cfg = SMALL
    hf = random_hf_state_dict(cfg, seed=1)
    hf["model.norm.weight"] = torch.ones(cfg.hidden_size + 1)
    with pytest.raises(ValueError, match=r"model\.norm\.weight.*\(65,\).*\(64,\)"):
        _bridge(cfg).hf_to_megatron(hf)


def test_checkpoint_without_mtp_when_mtp_requested():
    cfg = SMALL
    hf = {k: v for k, v in random_hf_state_dict(cfg, seed=1).items() if ".mtp_layers." not in k}
    with pytest.raises(ValueError, match="no MTP tensors"):
        _bridge(cfg).hf_to_megatron(hf, with_mtp=True)
    trunk_only = _bridge(cfg).hf_to_megatron(hf, with_mtp=False)
    assert not any(k.startswith("mtp.") for k in trunk_only)
    with pytest.raises(ValueError, match="num_nextn_predict_layers=0"):
        _bridge(cfg.replace(num_mtp_layers=0)).hf_to_megatron(hf, with_mtp=True)


def test_unknown_preset():
    with pytest.raises(ValueError, match=r"unknown model preset 'huge'.*tiny"):
        get_preset("huge")
