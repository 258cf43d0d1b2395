"""Tests for skyrl_mtp.inference.metrics: reading vLLM's counter objects, the metric arithmetic
against hand-computed values, per-engine deltas, and the start/pause/resume/stop windows (paused
time and paused work excluded, separate prefixes per label). No engine is started here; the
two-engine check against real vLLM counters is in test_engine.py.
"""

from __future__ import annotations

import pytest

from skyrl_mtp.inference.metrics import (
    SpecDecodeCounters,
    SpecDecodeMetricsTracker,
    counters_from_vllm_metrics,
    engine_deltas,
    metric_prefix,
    spec_decode_metrics,
    sum_counters,
)


def test_counters_from_vllm_metric_objects():
    # The real dataclasses vLLM's LLM.get_metrics() returns (not a mock of vLLM).
    from vllm.v1.metrics.reader import Counter, Gauge, Vector

    labels = [{"model_name": "m", "engine": "0"}, {"model_name": "m", "engine": "1"}]
    metrics = [
        Counter("vllm:spec_decode_num_drafts", labels[0], 10),
        Counter("vllm:spec_decode_num_drafts", labels[1], 5),
        Counter("vllm:spec_decode_num_draft_tokens", labels[0], 30),
        Counter("vllm:spec_decode_num_accepted_tokens", labels[0], 12),
        Vector("vllm:spec_decode_num_accepted_tokens_per_pos", labels[0], [7, 4, 1]),
        Vector("vllm:spec_decode_num_accepted_tokens_per_pos", labels[1], [2, 1]),
        Counter("vllm:generation_tokens", labels[0], 99),
        Counter("vllm:prompt_tokens", labels[0], 1000),  # ignored
        Gauge("vllm:num_requests_running", labels[0], 3.0),  # ignored
    ]
    c = counters_from_vllm_metrics(metrics)
    assert c == SpecDecodeCounters(num_drafts=15, num_draft_tokens=30, num_accepted_tokens=12,
                                   accepted_per_pos=(9, 5, 1), generation_tokens=99)
    # No drafting: the spec-decode metrics do not exist at all.
    assert counters_from_vllm_metrics([Counter("vllm:generation_tokens", labels[0], 7)]) == \
        SpecDecodeCounters(generation_tokens=7)


def test_metric_arithmetic_matches_definitions():
    delta = SpecDecodeCounters(num_drafts=40, num_draft_tokens=120, num_accepted_tokens=66,
                               accepted_per_pos=(36, 20, 10), generation_tokens=106)
    m = spec_decode_metrics(delta, generation_seconds=2.0, prefix="vllm/")
    assert m["vllm/draft_acceptance_rate"] == pytest.approx(66 / 120)
    assert m["vllm/draft_mean_acceptance_length"] == pytest.approx(1 + 66 / 40)
    assert [m[f"vllm/draft_acceptance_rate_pos_{i}"] for i in range(3)] == pytest.approx([36 / 40, 20 / 40, 10 / 40])
    assert (m["vllm/num_drafts"], m["vllm/num_draft_tokens"], m["vllm/num_accepted_tokens"]) == (40, 120, 66)
    assert m["vllm/generation_tokens_per_s"] == pytest.approx(53.0)
    assert m["vllm/generation_time_s"] == 2.0
    # Each accepted token at position i implies acceptance at all earlier positions, so the
    # per-position rates sum to the mean acceptance length minus one.
    assert sum(m[f"vllm/draft_acceptance_rate_pos_{i}"] for i in range(3)) == pytest.approx(
        m["vllm/draft_mean_acceptance_length"] - 1)


def test_no_drafting_reports_counts_but_no_undefined_ratios():
    m = spec_decode_metrics(SpecDecodeCounters(generation_tokens=50), generation_seconds=0.5, prefix="vllm/eval/")
    assert m["vllm/eval/num_drafts"] == 0 and m["vllm/eval/generation_tokens_per_s"] == 100.0
    assert not any("acceptance" in k for k in m)
    assert "vllm/eval/generation_tokens_per_s" not in spec_decode_metrics(SpecDecodeCounters(), 0.0, "vllm/eval/")


def test_counter_add_sub_and_engine_deltas():
    a = SpecDecodeCounters(1, 2, 1, (1,), 5)
    b = SpecDecodeCounters(3, 6, 4, (3, 1), 20)
    assert b - a == SpecDecodeCounters(2, 4, 3, (2, 1), 15)
    assert sum_counters([a, b]) == SpecDecodeCounters(4, 8, 5, (4, 1), 25)
    with pytest.raises(ValueError, match="backwards"):
        a - b
    # Engine 2 appeared and engine 1 vanished between the snapshots: only engine 0 is differenced.
    before = {0: a, 1: a}
    after = {0: b, 2: b}
    assert engine_deltas(after, before) == b - a


def test_metric_prefix():
    assert metric_prefix("train") == "vllm/"
    assert metric_prefix("eval") == "vllm/eval/"
    for bad in ("", "a/b"):
        with pytest.raises(ValueError):
            metric_prefix(bad)


class FakeEngines:
    """A counter source with a manual clock: 'generation' advances both counters and time."""

    def __init__(self, num_engines: int = 2):
        self.counters = {i: SpecDecodeCounters() for i in range(num_engines)}
        self.now = 100.0

    def read(self):
        return dict(self.counters)

    def clock(self):
        return self.now

    def generate(self, seconds: float, per_engine: SpecDecodeCounters):
        self.now += seconds
        for i in self.counters:
            self.counters[i] = self.counters[i] + per_engine

    def idle(self, seconds: float):
        self.now += seconds


def test_window_excludes_paused_time_and_paused_work():
    eng = FakeEngines(num_engines=2)
    tracker = SpecDecodeMetricsTracker(eng.read, clock=eng.clock)
    work = SpecDecodeCounters(num_drafts=10, num_draft_tokens=20, num_accepted_tokens=8,
                              accepted_per_pos=(6, 2), generation_tokens=18)
    eng.generate(1.0, SpecDecodeCounters(num_drafts=99, generation_tokens=999))  # before the window
    tracker.start("train")
    eng.generate(2.0, work)
    tracker.pause()
    eng.idle(50.0)  # e.g. reward computation and the training step
    tracker.start("eval")  # evaluation rollouts while training's window is paused
    eng.generate(1.0, work)
    eval_metrics = tracker.stop("eval")
    tracker.resume()
    eng.generate(1.0, work)
    train = tracker.stop()

    two_steps = sum_counters([work] * 4)  # 2 engines x 2 active segments
    assert train == spec_decode_metrics(two_steps, 3.0, "vllm/")
    assert train["vllm/generation_time_s"] == pytest.approx(3.0)  # not 55 s
    assert train["vllm/generation_tokens_per_s"] == pytest.approx(4 * 18 / 3.0)
    assert train["vllm/draft_acceptance_rate"] == pytest.approx(8 / 20)
    assert eval_metrics == spec_decode_metrics(sum_counters([work] * 2), 1.0, "vllm/eval/")
    assert tracker.open_labels == []


def test_window_errors():
    eng = FakeEngines(1)
    tracker = SpecDecodeMetricsTracker(eng.read, clock=eng.clock)
    with pytest.raises(RuntimeError, match="not open"):
        tracker.stop("train")
    tracker.start("train")
    with pytest.raises(RuntimeError, match="already open"):
        tracker.start("train")
    with pytest.raises(RuntimeError, match="not paused"):
        tracker.resume()
    tracker.pause()
    with pytest.raises(RuntimeError, match="already paused"):
        tracker.pause("train")
    tracker.start("eval")
    with pytest.raises(RuntimeError, match="without a label"):
        tracker.stop()  # two windows open: ambiguous
    tracker.stop("eval")
    # A window stopped while paused reports only its active segments.
    assert tracker.stop()["vllm/generation_time_s"] == 0.0
