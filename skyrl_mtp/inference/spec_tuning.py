"""Engine settings for MTP drafting in vLLM (0.25, V1 model runner), and the choice of k.

Why these settings (measured on an H200 at MiMo-7B shapes, docs/rollout_speed.md):

* vLLM captures CUDA graphs for token counts up to ``max_cudagraph_capture_size``, by default
  ``min(2 * max_num_seqs * (1 + k), 512)`` tokens, and rounds every capture size up to a multiple
  of the ``1 + k`` query tokens a decoding request has when drafting. A step whose token count is
  above the largest size runs without any CUDA graph (every kernel launched from Python), so with
  drafting the graphs stop at ``512 / (1 + k)`` requests: 256 at k=1, 128 at k=3, 102 at k=4.
  RL engines decode hundreds of requests at once, so the first part of every rollout (all
  requests alive) ran eagerly. :func:`engine_kwargs_for_drafting` asks for graphs at
  ``(1 + k) x b`` tokens for request counts ``b`` up to the engine's ``max_num_seqs``.
* vLLM's batch-size schedule for k (``num_speculative_tokens_per_batch_size``) makes the V1 model
  runner switch the whole engine to PIECEWISE graphs (attention outside the graphs) because the
  verification length changes at run time; one fixed k per engine keeps the FULL decode graphs.
  So k is chosen per engine (:func:`choose_k`) rather than per step.

:func:`choose_k` picks k from step costs (``c(k)`` = time of a k-draft step / a plain decode step,
``skyrl_mtp.inference.speedup``) and the live per-position acceptance the engines report.
:func:`step_costs_from_rollout` turns measured rollout wall times (``scripts/bench_rollout_speedup.py``)
into such step costs.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from skyrl_mtp.inference.speedup import tokens_per_step

# The smallest default ``max_num_batched_tokens`` of vLLM's offline LLM class on a GPU (GPUs with
# < 70 GiB; 16384 above). Graph sizes above ``max_num_batched_tokens`` are dropped by vLLM.
_SMALL_GPU_DEFAULT_BATCHED_TOKENS = 8192
_LARGE_BATCHED_TOKENS = 16384


def decode_batch_sizes(max_num_seqs: int) -> list[int]:
    """Request counts to capture a decode graph for: 1, 2, 4, then every 8 up to 256, then every
    16, and ``max_num_seqs`` itself (a batch is padded up to the next captured count)."""
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
    sizes = {1, 2, 4, *range(8, 257, 8), *range(272, max_num_seqs + 1, 16), max_num_seqs}
    return sorted(s for s in sizes if s <= max_num_seqs)


def engine_kwargs_for_drafting(k: int, max_num_seqs: int) -> dict:
    """Extra ``vllm.LLM`` keyword arguments for an engine that drafts ``k`` tokens per step (k=0:
    no drafting) and runs at most ``max_num_seqs`` requests at once: CUDA graphs at
    ``(1 + k) * b`` tokens for every request count ``b`` of :func:`decode_batch_sizes`, so every
    decode step up to ``max_num_seqs`` requests replays a graph. ``max_num_batched_tokens`` is
    raised only where the largest graph would not fit vLLM's smaller default."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    q = 1 + k
    sizes = [q * b for b in decode_batch_sizes(max_num_seqs)]
    kwargs: dict = {
        "max_num_seqs": max_num_seqs,
        "compilation_config": {"cudagraph_capture_sizes": sizes, "max_cudagraph_capture_size": sizes[-1]},
    }
    if sizes[-1] > _SMALL_GPU_DEFAULT_BATCHED_TOKENS:
        kwargs["max_num_batched_tokens"] = max(_LARGE_BATCHED_TOKENS, sizes[-1])
    return kwargs


def step_costs_from_rollout(wall_s: Mapping[int, float], acceptance_per_pos: Mapping[int, Sequence[float]]
                            ) -> dict[int, float]:
    """Effective step-cost ratios c(k) from whole-batch wall times measured at each k (k=0 needed)
    and the per-position acceptance measured in those runs: a batch of k-draft steps that yield
    ``tokens_per_step(k)`` tokens each takes ``1 / tokens_per_step(k)`` as many steps as without
    drafting, so ``c(k) = tokens_per_step(k) * wall(k) / wall(0)``."""
    if 0 not in wall_s:
        raise ValueError(f"step costs need the k=0 wall time; got k={sorted(wall_s)}")
    out = {}
    for k, wall in sorted(wall_s.items()):
        rates = list(acceptance_per_pos.get(k, ())) if k else []
        out[k] = tokens_per_step(rates, k) * wall / wall_s[0]
    return out


def extend_acceptance(acceptance_per_pos: Sequence[float], k: int) -> list[float]:
    """Per-position acceptance for k positions from fewer measured ones: each further position keeps
    the last measured conditional rate a_i / a_{i-1} (a_0 = 1). An estimate, used only to score k
    beyond what the engine drafts now."""
    rates = [float(a) for a in acceptance_per_pos]
    if not rates:
        raise ValueError("need at least one measured position")
    cond = rates[-1] / (rates[-2] if len(rates) > 1 else 1.0) if rates[-1] > 0 else 0.0
    while len(rates) < k:
        rates.append(rates[-1] * min(cond, 1.0))
    return rates[:k] if k else []


def choose_k(step_cost_ratio: Mapping[int, float], acceptance_per_pos: Sequence[float],
             min_gain: float = 0.02, extrapolate: bool = False) -> int:
    """The k (a key of ``step_cost_ratio``, which holds c(0) = 1 implicitly) with the highest
    predicted speedup ``tokens_per_step(k) / c(k)``; 0 (no drafting) unless the best one beats
    1 + ``min_gain``. Ties go to the smaller k. Only k covered by the measured acceptance are
    considered unless ``extrapolate`` (then :func:`extend_acceptance`)."""
    best_k, best = 0, 1.0 + min_gain
    for k in sorted(step_cost_ratio):
        if k == 0:
            continue
        if k > len(acceptance_per_pos) and not extrapolate:
            continue
        rates = extend_acceptance(acceptance_per_pos, k) if k > len(acceptance_per_pos) else acceptance_per_pos
        speedup = tokens_per_step(rates, k) / step_cost_ratio[k]
        if speedup > best + 1e-12:
            best_k, best = k, speedup
    return best_k
