import pytest

from skyrl_mtp.inference.speedup import best_k, predicted_speedup, speedup_table, step_cost_ratios, tokens_per_step


def test_tokens_per_step_matches_skyrl_published_k3():
    # SkyRL's Qwen3.5-9B run: 88.6 / 77.0 / 66.3 % per position at k=3 -> 3.319 tokens per step.
    assert tokens_per_step([0.886, 0.770, 0.663], 3) == pytest.approx(3.319)
    assert tokens_per_step([0.886, 0.770, 0.663], 1) == pytest.approx(1.886)
    assert tokens_per_step([0.886], 0) == 1.0


def test_speedup_against_a_simulated_decoder():
    # Independent reference: simulate steps where draft i is accepted iff all earlier ones were,
    # with conditional probabilities p_i; count tokens; divide by per-step cost.
    import random

    cond = [0.9, 0.8, 0.7]
    rng = random.Random(0)
    steps, tokens, accepted = 200_000, 0, [0, 0, 0]
    for _ in range(steps):
        tokens += 1
        for i, p in enumerate(cond):
            if rng.random() >= p:
                break
            tokens += 1
            accepted[i] += 1
    a = [n / steps for n in accepted]
    assert predicted_speedup(a, 3, 1.5) == pytest.approx(tokens / steps / 1.5, rel=1e-12)
    assert a[0] == pytest.approx(0.9, abs=0.01) and a[2] == pytest.approx(0.9 * 0.8 * 0.7, abs=0.01)


def test_table_and_best_k():
    table = speedup_table([0.8, 0.6, 0.4], {1: {0: 1.0, 1: 1.1, 2: 1.2, 3: 1.3}, 256: {0: 1.0, 1: 1.5, 2: 2.2, 3: 3.0}})
    assert table[1][2] == pytest.approx(2.4 / 1.2)
    assert best_k(table) == {1: 3, 256: 1}


@pytest.mark.parametrize("rates,k", [([0.5, 0.7], 2), ([1.2], 1), ([0.5], 2)])
def test_bad_input_is_refused(rates, k):
    with pytest.raises(ValueError):
        tokens_per_step(rates, k)
    with pytest.raises(ValueError, match="step_cost_ratio"):
        predicted_speedup([0.5], 1, 0.0)


def test_step_cost_ratios_from_a_json_report():
    # keys as JSON leaves them (strings); k=3 lacks batch 8, which k=0 has
    per_k = {"0": {"batches": {"1": {"median_s": 2.0, "step_ms": 10.0}, "8": {"median_s": 4.0, "step_ms": 20.0}}},
             "3": {"batches": {"1": {"median_s": 3.0, "step_ms": 16.0}}}}
    assert step_cost_ratios(per_k) == {1: {0: 1.0, 3: 1.5}, 8: {0: 1.0}}
    assert step_cost_ratios(per_k, "step_ms")[1][3] == pytest.approx(1.6)
    with pytest.raises(ValueError, match="need the k=0 runs"):
        step_cost_ratios({"3": per_k["3"]})
