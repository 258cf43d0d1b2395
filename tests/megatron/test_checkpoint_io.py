"""Checkpoint I/O that scales: sharded safetensors with an index (written and read back, in bf16 too),
each TP rank reading only its slices, the frozen MTP head read alone, and transformers loading a
sharded export of a Megatron model with the same logits. (vLLM loading a sharded export with MTP
drafting: tests/megatron/test_export_to_vllm.py.)"""

from __future__ import annotations

import json
import struct

import pytest
import torch

from skyrl_mtp.megatron.bridge import make_bridge, read_megatron_shard
from skyrl_mtp.models.checkpoint import (INDEX_FILE, CheckpointReader, load_hf_state_dict, load_mtp_head,
                                         random_hf_state_dict, save_hf_checkpoint)
from skyrl_mtp.models.mimo import get_preset

# vocab 500: Megatron pads it to 512 (tp 1, 2) or 1024 (tp 4), so a rank's rows end in padding
CFG = get_preset("tiny").replace(vocab_size=500, init_std=0.3)
SHARD = 96 * 1024  # bytes: the tiny model (~2.5 MB in fp32) is written as many shards


@pytest.fixture(scope="module")
def state():
    return random_hf_state_dict(CFG, seed=3)


@pytest.fixture(scope="module")
def sharded(state, tmp_path_factory):
    return save_hf_checkpoint(CFG, state, tmp_path_factory.mktemp("ckpt") / "sharded", max_shard_bytes=SHARD)


def test_large_model_init_draws_each_tensor_from_its_own_generator(monkeypatch, state):
    """Above PARALLEL_INIT_NUMEL (forced here) every tensor has its own seeded generator and the
    tensors are drawn on threads: the result is deterministic, in the requested dtype, with the
    sequential path's structure (ones, zeros, per-tensor std) and each tensor drawn independently."""
    import skyrl_mtp.models.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "PARALLEL_INIT_NUMEL", 0)
    first = checkpoint.random_hf_state_dict(CFG, seed=3, dtype=torch.bfloat16)
    again = checkpoint.random_hf_state_dict(CFG, seed=3, dtype=torch.bfloat16)
    assert first.keys() == state.keys()
    scaled = CFG.init_std / (2.0 * CFG.num_layers) ** 0.5
    for name, value in first.items():
        assert value.dtype == torch.bfloat16 and value.shape == state[name].shape, name
        assert torch.equal(value, again[name]), name
        if name.endswith("norm.weight") or name.endswith(".bias"):
            assert torch.equal(value.float(), state[name]), name
        elif value.numel() >= 4096:
            std = scaled if (".o_proj." in name or ".down_proj." in name) else CFG.init_std
            assert abs(value.float().std().item() / std - 1) < 0.1, name
    # two same-shaped matrices of different layers are not the same draw
    assert not torch.equal(first["model.layers.0.mlp.up_proj.weight"], first["model.layers.1.mlp.up_proj.weight"])


def test_sharded_checkpoint_has_an_index_and_reads_back(state, sharded):
    index = json.loads((sharded / INDEX_FILE).read_text())
    files = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(files) > 5 and set(index["weight_map"].values()) == set(files)
    assert set(index["weight_map"]) == set(state)
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in state.values())
    assert not (sharded / "model.safetensors").exists()
    back = load_hf_state_dict(sharded)
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)


def test_bfloat16_export_holds_the_rounded_weights(state, tmp_path):
    out = save_hf_checkpoint(CFG, state, tmp_path / "bf16", torch_dtype="bfloat16", max_shard_bytes=SHARD)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    back = load_hf_state_dict(out)
    for name, tensor in state.items():
        assert back[name].dtype == torch.bfloat16 and torch.equal(back[name], tensor.to(torch.bfloat16)), name
    # bf16 halves the bytes: the index's total is the fp32 total / 2
    assert json.loads((out / INDEX_FILE).read_text())["metadata"]["total_size"] == sum(t.numel() * 2 for t in state.values())


@pytest.mark.parametrize("tp_size", [1, 2])
@pytest.mark.parametrize("with_mtp", [True, False])
def test_each_tp_rank_reads_its_slices(state, sharded, tp_size, with_mtp):
    """The slices a rank reads are exactly its shard of the fully converted checkpoint."""
    bridge = make_bridge(CFG, tp_size=tp_size)
    full = bridge.hf_to_megatron(state, with_mtp=with_mtp)
    for rank in range(tp_size):
        want = bridge.shard_for_tp(full, rank, tp_size)
        got = read_megatron_shard(bridge, sharded, tp_rank=rank, tp_size=tp_size, with_mtp=with_mtp)
        assert set(got) == set(want)
        for name in want:
            assert torch.equal(got[name], want[name]), (rank, name)
        assert any(n.startswith("mtp.") for n in got) == with_mtp


def test_reading_a_slice_reads_only_its_rows(sharded):
    """A rank's rows of the embedding come from safetensors' lazy slice: the shape says so."""
    with CheckpointReader(sharded) as reader:
        rows = reader.get_slice("model.embed_tokens.weight")[256:500]
        assert rows.shape == (244, CFG.hidden_size)
        assert torch.equal(rows, reader.get("model.embed_tokens.weight")[256:500])


def _zero_tensor_data(file, keep) -> None:
    """Overwrite the bytes of every tensor not matching `keep` with zeros (header unchanged)."""
    raw = bytearray(file.read_bytes())
    header_len = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + header_len])
    base = 8 + header_len
    for name, meta in header.items():
        if name != "__metadata__" and not keep(name):
            start, stop = meta["data_offsets"]
            raw[base + start:base + stop] = bytes(stop - start)
    file.write_bytes(bytes(raw))


def test_frozen_head_is_read_alone(state, tmp_path):
    """load_mtp_head (the MTP-off path's frozen head) uses only the head's bytes: with every other
    tensor's data zeroed on disk it still returns the head exactly (a full read shows the zeros)."""
    out = save_hf_checkpoint(CFG, state, tmp_path / "one_file")
    _zero_tensor_data(out / "model.safetensors", keep=lambda n: ".mtp_layers." in n)
    head = load_mtp_head(out)
    want = {k: v for k, v in state.items() if ".mtp_layers." in k}
    assert set(head) == set(want) and all(torch.equal(head[k], want[k]) for k in want)
    assert load_hf_state_dict(out, ["model.layers.0.mlp.up_proj.weight"])["model.layers.0.mlp.up_proj.weight"].abs().sum() == 0


def test_missing_shard_is_named(state, tmp_path):
    out = save_hf_checkpoint(CFG, state, tmp_path / "gap", max_shard_bytes=SHARD)
    victim = sorted(out.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        CheckpointReader(out)


def test_transformers_loads_a_sharded_megatron_export(megatron_single, state, tmp_path):
    """A Megatron trunk + head exported as shards: transformers' Qwen2ForCausalLM loads the index and
    its logits equal Megatron's (float32; 1e-4 covers the two implementations' kernel order)."""
    from transformers import AutoModelForCausalLM

    from skyrl_mtp.megatron.bridge import load_module_state, split_trunk_and_mtp
    from skyrl_mtp.megatron.export import export_hf_checkpoint
    from skyrl_mtp.megatron.model_builder import build_mtp_block, build_trunk, causal_mask

    bridge = make_bridge(CFG)
    trunk_state, head_state = split_trunk_and_mtp(bridge.hf_to_megatron(state))
    trunk, head = build_trunk(CFG).eval(), build_mtp_block(CFG).eval()
    load_module_state(trunk, trunk_state)
    load_module_state(head, head_state)
    out = export_hf_checkpoint(trunk, head, bridge, tmp_path / "export", max_shard_bytes=SHARD)
    assert (out / INDEX_FILE).is_file() and len(list(out.glob("model-*.safetensors"))) > 5

    ids = torch.tensor([[1, 270, 224, 7, 9, 4, 12, 224, 29, 300, 5]])
    with torch.no_grad():
        want = trunk(ids, torch.arange(ids.shape[1])[None], causal_mask(ids.shape[1]))[..., :CFG.vocab_size]
        ref = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
        got = ref(ids).logits
    torch.testing.assert_close(got, want.float(), rtol=0, atol=1e-4)
