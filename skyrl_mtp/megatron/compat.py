"""What the installed megatron-core offers, checked once, failing loudly on drift.

Supported: megatron-core 0.16.x (CPU stack, Python 3.11) and >= 0.18 (GPU stack). Every
version-dependent branch in the project reads a flag from here instead of comparing versions.
"""

from __future__ import annotations

import inspect
from functools import lru_cache

from packaging.version import Version

MIN_VERSION = Version("0.16.0")


@lru_cache(maxsize=None)
def mcore_version() -> Version:
    import megatron.core

    return Version(megatron.core.__version__)


@lru_cache(maxsize=None)
def has_native_output_processor() -> bool:
    """megatron-core >= 0.18: GPTModel.forward takes keyword-only output_processor(_context)."""
    from megatron.core.models.gpt import GPTModel

    params = inspect.signature(GPTModel.forward).parameters
    return "output_processor" in params and "output_processor_context" in params


@lru_cache(maxsize=None)
def has_mtp_detach_heads() -> bool:
    from megatron.core.transformer.transformer_config import TransformerConfig

    return "mtp_detach_heads" in {f.name for f in __import__("dataclasses").fields(TransformerConfig)}


def check_supported() -> None:
    """Raises RuntimeError naming the version and the missing piece if this Megatron can't be used."""
    version = mcore_version()
    if version < MIN_VERSION:
        raise RuntimeError(f"megatron-core {version} is too old: skyrl_mtp needs >= {MIN_VERSION}")
    missing = []
    try:
        from megatron.core.transformer import multi_token_prediction as mtp_mod
    except ImportError as err:
        raise RuntimeError(f"megatron-core {version}: no multi_token_prediction module ({err})") from err
    for name in ("MultiTokenPredictionBlock", "MultiTokenPredictionLayer", "roll_tensor"):
        if not hasattr(mtp_mod, name):
            missing.append(f"megatron.core.transformer.multi_token_prediction.{name}")
    from megatron.core.models.gpt import GPTModel

    if not hasattr(GPTModel, "_postprocess"):
        missing.append("GPTModel._postprocess")
    if version >= Version("0.18.0") and not has_native_output_processor():
        missing.append("GPTModel.forward(output_processor=, output_processor_context=) (expected from 0.18)")
    if missing:
        raise RuntimeError(f"megatron-core {version} lacks what skyrl_mtp relies on: {missing}. "
                           "Pin megatron-core==0.16.1 (CPU) or a tested >= 0.18 release (GPU: 0.19.2).")
