"""Rollout inference: vLLM engines (Ray actors) that generate with MTP drafting, receive the policy's
weights every training step, and report speculative-decoding metrics.

Modules:
    config       ``RolloutConfig`` (engines) and ``SamplingConfig`` (one generation call), validated
                 before any engine starts.
    engine       ``RolloutEngine``: one vLLM ``LLM`` inside a Ray actor; generation results
                 (``RolloutSample``) carry token ids, sampled-token logprobs, finish reasons and the
                 weight version that produced them.
    group        ``RolloutEngineGroup``: the driver-side handle over several engines (data parallel):
                 prompt balancing, weight sync fan-out, engine-failure reporting, metrics windows.
    transports   how the policy's weights reach the engines: the two-phase push shared by all
                 transports (``transports.base``), the wire format (``transports.buckets``) and one
                 module per transport (``ray``, ``cuda_ipc``).
    worker_extension  the vLLM worker extension that stages the buckets and reloads the target
                 model and the MTP drafter in place.
    metrics      spec-decode counters, their per-window deltas and the metric arithmetic (pure
                 functions), and the ``start/pause/resume/stop`` window tracker.
    vllm_fixes   in-process fixes for verified vLLM defects (applied only where detected).
    text_only    makes vLLM serve text-only Qwen3.5 exports (torchvision shim; registration and
                 drafter mapping on vLLMs that lack them).

vLLM and Ray are imported lazily: importing this package costs nothing until an engine starts.
"""
