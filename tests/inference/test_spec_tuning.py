"""spec_tuning against hand-computed values (CPU only)."""

import inspect

import pytest

from skyrl_mtp.inference.spec_tuning import (
    choose_k,
    decode_batch_sizes,
    engine_kwargs_for_drafting,
    extend_acceptance,
    step_costs_from_rollout,
)


def test_decode_batch_sizes_by_hand():
    assert decode_batch_sizes(1) == [1]
    assert decode_batch_sizes(20) == [1, 2, 4, 8, 16, 20]
    sizes = decode_batch_sizes(300)
    # 1, 2, 4; 8..256 in steps of 8 (32 values); 272, 288; and 300 itself.
    assert sizes[:5] == [1, 2, 4, 8, 16] and sizes[-4:] == [256, 272, 288, 300]
    assert len(sizes) == 3 + 32 + 2 + 1
    with pytest.raises(ValueError):
        decode_batch_sizes(0)


def test_engine_kwargs_k3_128_by_hand():
    kw = engine_kwargs_for_drafting(3, 128)
    cc = kw["compilation_config"]
    # 4 query tokens per request: 4 x [1, 2, 4, 8, 16, 24, ..., 128]
    assert cc["cudagraph_capture_sizes"][:6] == [4, 8, 16, 32, 64, 96]
    assert cc["cudagraph_capture_sizes"][-1] == 512 == cc["max_cudagraph_capture_size"]
    assert len(cc["cudagraph_capture_sizes"]) == 3 + 16
    assert kw["max_num_seqs"] == 128
    assert "max_num_batched_tokens" not in kw  # 512 tokens fit every vLLM default


def test_engine_kwargs_large_batches_by_hand():
    # vLLM's default caps graphs at 512 tokens; with k=4 and 512 requests the largest step is 2560.
    kw = engine_kwargs_for_drafting(4, 512)
    assert kw["compilation_config"]["max_cudagraph_capture_size"] == 2560
    assert "max_num_batched_tokens" not in kw
    # 5 x 2048 = 10240 > 8192 (the small-GPU default): raise it to 16384.
    assert engine_kwargs_for_drafting(4, 2048)["max_num_batched_tokens"] == 16384
    # 8 x 4096 = 32768: raise it to exactly the largest graph.
    assert engine_kwargs_for_drafting(7, 4096)["max_num_batched_tokens"] == 32768
    # k=0: one token per request, graphs up to max_num_seqs.
    assert engine_kwargs_for_drafting(0, 20)["compilation_config"]["cudagraph_capture_sizes"] == [1, 2, 4, 8, 16, 20]
    with pytest.raises(ValueError):
        engine_kwargs_for_drafting(-1, 8)


@pytest.mark.parametrize("k,seqs", [(1, 512), (2, 512), (3, 1024), (4, 100)])
def test_sizes_survive_vllms_spec_decode_rounding(k, seqs):
    """vLLM rounds every capture size up to a multiple of 1 + k; ours must come back unchanged."""
    vllm_config = pytest.importorskip("vllm.config")
    cc_kwargs = engine_kwargs_for_drafting(k, seqs)["compilation_config"]
    sizes = cc_kwargs["cudagraph_capture_sizes"]
    assert all(s % (1 + k) == 0 for s in sizes) and sizes == sorted(set(sizes))
    cc = vllm_config.CompilationConfig(**cc_kwargs)
    adjust = cc.adjust_cudagraph_sizes_for_spec_decode
    if len(inspect.signature(adjust).parameters) == 2:  # vLLM 0.25: (query_len, tensor_parallel_size)
        adjust(1 + k, 1)
    else:  # vLLM 0.3x: (query_len)
        adjust(1 + k)
    assert cc.cudagraph_capture_sizes == sizes
    assert cc.max_cudagraph_capture_size == (1 + k) * seqs


def test_step_costs_from_rollout_by_hand():
    # H200 numbers (docs/rollout_speed.md): k=0 13.45 s, k=3 8.66 s at 0.886/0.770/0.663.
    c = step_costs_from_rollout({0: 13.45, 3: 8.66}, {3: [0.886, 0.770, 0.663]})
    assert c[0] == 1.0
    assert c[3] == pytest.approx(3.319 * 8.66 / 13.45)  # = 2.13700...
    assert c[3] == pytest.approx(2.13700, abs=1e-5)
    with pytest.raises(ValueError):
        step_costs_from_rollout({3: 8.66}, {3: [0.9, 0.8, 0.7]})


def test_extend_acceptance_by_hand():
    a = extend_acceptance([0.886, 0.770, 0.663], 4)
    assert a[:3] == [0.886, 0.770, 0.663]
    assert a[3] == pytest.approx(0.663 * 0.663 / 0.770)  # 0.570869
    assert a[3] == pytest.approx(0.570869, abs=1e-6)
    assert extend_acceptance([0.8], 3) == pytest.approx([0.8, 0.64, 0.512])
    assert extend_acceptance([0.9, 0.5], 1) == [0.9]


def test_choose_k_by_hand():
    c = {1: 1.4, 2: 2.0, 3: 2.1}
    # 1.886/1.4 = 1.347, 2.656/2.0 = 1.328, 3.319/2.1 = 1.580
    assert choose_k(c, [0.886, 0.770, 0.663]) == 3
    # 1.723/1.4 = 1.231, 2.222/2.0 = 1.111, 2.456/2.1 = 1.170
    assert choose_k(c, [0.723, 0.499, 0.234]) == 1
    assert choose_k({1: 1.9}, [0.8]) == 0  # 1.8/1.9 < 1: no drafting
    assert choose_k({1: 1.75}, [0.8]) == 1  # 1.0286 > 1.02
    assert choose_k({1: 1.75}, [0.8], min_gain=0.05) == 0
    # k=4 is scored only with extrapolation: 3.889869/2.0 = 1.945 > 1.347
    assert choose_k({1: 1.4, 4: 2.0}, [0.886, 0.770, 0.663]) == 1
    assert choose_k({1: 1.4, 4: 2.0}, [0.886, 0.770, 0.663], extrapolate=True) == 4
    # ties go to the smaller k: 1.8/1.2 = 1.5 = 2.4/1.6
    assert choose_k({1: 1.2, 2: 1.6}, [0.8, 0.6]) == 1
