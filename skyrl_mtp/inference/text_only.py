"""Keeps torchvision off the text-only import path of vLLM's Qwen3.5 models (CPU stack).

Why: ``vllm.model_executor.models.qwen3_5`` (the text model and, through it, ``qwen3_5_mtp``)
imports ``qwen3_vl`` at module level, which imports
``transformers.models.qwen2_vl.image_processing_qwen2_vl``; that module imports torchvision
unconditionally. The CPU stack has no torchvision that matches torch 2.13.0+cpu: the registry's
0.28 is a CUDA build and fails with "operator torchvision::nms does not exist", and no +cpu wheel
or sdist is available, so ``scripts/setup_env.sh`` uninstalls it. Without a fix, every
``Qwen3_5*`` architecture fails to import.

The fix: when torchvision is *not installed*, register under that module name a module holding the
PIL-backed image processor transformers ships for exactly this case
(``image_processing_pil_qwen2_vl``: the same ``smart_resize``, ``Qwen2VLImageProcessorPil``), with
``Qwen2VLImageProcessor`` bound to the PIL class, as transformers' own lazy ``qwen2_vl`` package
already falls back to. Text-only models never call any of it; a multimodal request on such a stack
gets transformers' PIL processor. Where torchvision *is* installed nothing is touched (a broken
CUDA build then fails loudly, as before).

It must run in every process that may import the model: the driver, vLLM's engine core and
workers, and vLLM's model-registry subprocess (``_run_in_subprocess`` inspects the class in a fresh
interpreter). vLLM runs its ``vllm.general_plugins`` entry points in all of these before importing a
model, so :func:`register_vllm_plugin` is declared there in ``pyproject.toml``.
"""

from __future__ import annotations

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


def register_vllm_plugin() -> None:
    """Entry point of the ``vllm.general_plugins`` group (see pyproject.toml)."""
    install_text_only_shim()
