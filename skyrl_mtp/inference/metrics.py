"""Speculative-decoding and throughput metrics of the rollout engines.

Owns three things:
- ``SpecDecodeCounters``: the cumulative counters one engine exposes through ``LLM.get_metrics()``
  (``vllm:spec_decode_num_drafts``, ``..._num_draft_tokens``, ``..._num_accepted_tokens``, the
  vector ``..._num_accepted_tokens_per_pos`` and ``vllm:generation_tokens``), with + and -.
- the metric arithmetic as pure functions (``spec_decode_metrics``), testable without vLLM:
      draft_acceptance_rate          = accepted / draft_tokens
      draft_mean_acceptance_length   = 1 + accepted / drafts
      draft_acceptance_rate_pos_{i}  = accepted_per_pos[i] / drafts
      generation_tokens_per_s        = generation_tokens / active (un-paused) window seconds
- ``SpecDecodeMetricsTracker``: labelled windows (``start/pause/resume/stop``). A window sums
  per-engine counter deltas over its active segments only, so work done while it is paused (e.g.
  evaluation rollouts under their own window) never leaks into it, and paused wall time is not
  counted as generation time. Label "train" reports under ``vllm/``, any other label ``L`` under
  ``vllm/L/``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

VLLM_NUM_DRAFTS = "vllm:spec_decode_num_drafts"
VLLM_NUM_DRAFT_TOKENS = "vllm:spec_decode_num_draft_tokens"
VLLM_NUM_ACCEPTED_TOKENS = "vllm:spec_decode_num_accepted_tokens"
VLLM_ACCEPTED_PER_POS = "vllm:spec_decode_num_accepted_tokens_per_pos"
VLLM_GENERATION_TOKENS = "vllm:generation_tokens"

TRAIN_LABEL = "train"


@dataclass(frozen=True)
class SpecDecodeCounters:
    """Cumulative (or, after subtraction, windowed) counters of one engine or a sum of engines."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: tuple[int, ...] = ()
    generation_tokens: int = 0

    def __add__(self, other: "SpecDecodeCounters") -> "SpecDecodeCounters":
        return SpecDecodeCounters(
            num_drafts=self.num_drafts + other.num_drafts,
            num_draft_tokens=self.num_draft_tokens + other.num_draft_tokens,
            num_accepted_tokens=self.num_accepted_tokens + other.num_accepted_tokens,
            accepted_per_pos=_combine(self.accepted_per_pos, other.accepted_per_pos, 1),
            generation_tokens=self.generation_tokens + other.generation_tokens,
        )

    def __sub__(self, before: "SpecDecodeCounters") -> "SpecDecodeCounters":
        """The counts accumulated since ``before``; raises if any counter went backwards."""
        delta = SpecDecodeCounters(
            num_drafts=self.num_drafts - before.num_drafts,
            num_draft_tokens=self.num_draft_tokens - before.num_draft_tokens,
            num_accepted_tokens=self.num_accepted_tokens - before.num_accepted_tokens,
            accepted_per_pos=_combine(self.accepted_per_pos, before.accepted_per_pos, -1),
            generation_tokens=self.generation_tokens - before.generation_tokens,
        )
        values = (delta.num_drafts, delta.num_draft_tokens, delta.num_accepted_tokens,
                  delta.generation_tokens, *delta.accepted_per_pos)
        if min(values, default=0) < 0:
            raise ValueError(f"counters went backwards (engine restarted?): before={before}, after={self}")
        return delta


def _combine(a: tuple[int, ...], b: tuple[int, ...], sign: int) -> tuple[int, ...]:
    n = max(len(a), len(b))
    a = tuple(a) + (0,) * (n - len(a))
    b = tuple(b) + (0,) * (n - len(b))
    return tuple(x + sign * y for x, y in zip(a, b))


def sum_counters(counters: Iterable[SpecDecodeCounters]) -> SpecDecodeCounters:
    total = SpecDecodeCounters()
    for c in counters:
        total = total + c
    return total


def counters_from_vllm_metrics(metrics: Iterable[object]) -> SpecDecodeCounters:
    """Reads the counters from ``LLM.get_metrics()`` (``vllm.v1.metrics.reader`` Counter/Vector
    objects). Samples of the same name with different labels (several engines in one process)
    are summed; metrics absent because drafting is off count as 0."""
    scalars = {VLLM_NUM_DRAFTS: 0, VLLM_NUM_DRAFT_TOKENS: 0, VLLM_NUM_ACCEPTED_TOKENS: 0, VLLM_GENERATION_TOKENS: 0}
    per_pos: tuple[int, ...] = ()
    for m in metrics:
        name = getattr(m, "name", None)
        if name in scalars:
            scalars[name] += int(getattr(m, "value"))
        elif name == VLLM_ACCEPTED_PER_POS:
            per_pos = _combine(per_pos, tuple(int(v) for v in getattr(m, "values")), 1)
    return SpecDecodeCounters(
        num_drafts=scalars[VLLM_NUM_DRAFTS],
        num_draft_tokens=scalars[VLLM_NUM_DRAFT_TOKENS],
        num_accepted_tokens=scalars[VLLM_NUM_ACCEPTED_TOKENS],
        accepted_per_pos=per_pos,
        generation_tokens=scalars[VLLM_GENERATION_TOKENS],
    )


def metric_prefix(label: str) -> str:
    """'vllm/' for the training label, 'vllm/<label>/' otherwise."""
    if not label or "/" in label:
        raise ValueError(f"metrics label must be a non-empty name without '/', got {label!r}")
    return "vllm/" if label == TRAIN_LABEL else f"vllm/{label}/"


def spec_decode_metrics(delta: SpecDecodeCounters, generation_seconds: float,
                        prefix: str = "vllm/") -> dict[str, float]:
    """The logged metrics of one window. Ratios whose denominator is 0 (no drafting, no time) are
    left out rather than reported as NaN."""
    out: dict[str, float] = {
        f"{prefix}num_drafts": float(delta.num_drafts),
        f"{prefix}num_draft_tokens": float(delta.num_draft_tokens),
        f"{prefix}num_accepted_tokens": float(delta.num_accepted_tokens),
        f"{prefix}generation_tokens": float(delta.generation_tokens),
        f"{prefix}generation_time_s": float(generation_seconds),
    }
    if delta.num_draft_tokens > 0:
        out[f"{prefix}draft_acceptance_rate"] = delta.num_accepted_tokens / delta.num_draft_tokens
    if delta.num_drafts > 0:
        out[f"{prefix}draft_mean_acceptance_length"] = 1.0 + delta.num_accepted_tokens / delta.num_drafts
        for i, accepted in enumerate(delta.accepted_per_pos):
            out[f"{prefix}draft_acceptance_rate_pos_{i}"] = accepted / delta.num_drafts
    if generation_seconds > 0:
        out[f"{prefix}generation_tokens_per_s"] = delta.generation_tokens / generation_seconds
    return out


def engine_deltas(after: Mapping[int, SpecDecodeCounters],
                  before: Mapping[int, SpecDecodeCounters]) -> SpecDecodeCounters:
    """Sum over engines present in both snapshots of (after - before); an engine that died or was
    added in between contributes nothing (its counters cannot be differenced)."""
    return sum_counters(after[i] - before[i] for i in sorted(after.keys() & before.keys()))


@dataclass
class _Window:
    label: str
    prefix: str
    baseline: dict[int, SpecDecodeCounters] | None  # None while paused
    segment_start: float | None
    total: SpecDecodeCounters = field(default_factory=SpecDecodeCounters)
    active_s: float = 0.0


class SpecDecodeMetricsTracker:
    """Labelled metric windows over a set of engines.

    ``read_counters`` returns the current cumulative counters per engine index;
    ``clock`` returns seconds (``time.perf_counter`` by default). Several windows may be open at
    once (e.g. "train" paused while "eval" runs); ``pause/resume/stop`` without a label act on the
    only open window, or the only running one.
    """

    def __init__(self, read_counters: Callable[[], Mapping[int, SpecDecodeCounters]],
                 clock: Callable[[], float] = time.perf_counter):
        self._read = read_counters
        self._clock = clock
        self._windows: dict[str, _Window] = {}

    @property
    def open_labels(self) -> list[str]:
        return list(self._windows)

    def is_running(self, label: str) -> bool:
        return label in self._windows and self._windows[label].baseline is not None

    def start(self, label: str) -> None:
        prefix = metric_prefix(label)
        if label in self._windows:
            raise RuntimeError(f"metrics window {label!r} is already open; stop() it first")
        self._windows[label] = _Window(label, prefix, baseline=dict(self._read()), segment_start=self._clock())

    def pause(self, label: str | None = None) -> None:
        w = self._select(label, want_running=True, action="pause")
        self._close_segment(w)

    def resume(self, label: str | None = None) -> None:
        w = self._select(label, want_running=False, action="resume")
        w.baseline = dict(self._read())
        w.segment_start = self._clock()

    def stop(self, label: str | None = None) -> dict[str, float]:
        w = self._select(label, want_running=None, action="stop")
        if w.baseline is not None:
            self._close_segment(w)
        del self._windows[w.label]
        return spec_decode_metrics(w.total, w.active_s, w.prefix)

    def _close_segment(self, w: _Window) -> None:
        now_counters = dict(self._read())
        now = self._clock()
        assert w.baseline is not None and w.segment_start is not None
        w.total = w.total + engine_deltas(now_counters, w.baseline)
        w.active_s += now - w.segment_start
        w.baseline, w.segment_start = None, None

    def _select(self, label: str | None, *, want_running: bool | None, action: str) -> _Window:
        if label is not None:
            if label not in self._windows:
                raise RuntimeError(f"cannot {action} metrics window {label!r}: it is not open "
                                   f"(open: {self.open_labels})")
            w = self._windows[label]
        else:
            candidates = list(self._windows.values())
            if want_running is not None and len(candidates) > 1:
                candidates = [c for c in candidates if (c.baseline is not None) == want_running]
            if len(candidates) != 1:
                raise RuntimeError(f"cannot {action} without a label: open windows are {self.open_labels}")
            w = candidates[0]
        if want_running is True and w.baseline is None:
            raise RuntimeError(f"cannot pause metrics window {w.label!r}: it is already paused")
        if want_running is False and w.baseline is not None:
            raise RuntimeError(f"cannot resume metrics window {w.label!r}: it is not paused")
        return w
