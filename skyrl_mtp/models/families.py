"""Model families by name: which config class reads a checkpoint, and every preset of every family.

The rest of the code asks here instead of importing one family: ``config_from_pretrained(path)``
picks the family from config.json's ``model_type``; ``get_preset(name)`` looks in every family's
presets. A family's config carries ``family`` ("mimo" when absent) and
``drafter_zeroes_first_embedding`` (how vLLM's drafter of that family feeds position 0).
"""

from __future__ import annotations

from pathlib import Path

from skyrl_mtp.models.hf_config import read_config_json

# config.json model_type -> family (the text model types of vLLM's Qwen3.5 loaders; MiMo is qwen2).
QWEN3_5_MODEL_TYPES = ("qwen3_5_text", "qwen3_5")


def family_of(cfg) -> str:
    return getattr(cfg, "family", "mimo")


def all_presets() -> dict:
    from skyrl_mtp.models import mimo, qwen3_5

    clash = set(mimo.PRESETS) & set(qwen3_5.PRESETS)
    if clash:
        raise AssertionError(f"preset names used by two families: {sorted(clash)}")
    return {**mimo.PRESETS, **qwen3_5.PRESETS}


def get_preset(name: str):
    presets = all_presets()
    if name not in presets:
        raise ValueError(f"unknown model preset {name!r}; known presets: {sorted(presets)}")
    return presets[name]


def model_type_of(hf: dict) -> str | None:
    return (hf.get("text_config") or {}).get("model_type") or hf.get("model_type")


def config_from_hf(hf: dict, name: str = "hf"):
    if model_type_of(hf) in QWEN3_5_MODEL_TYPES:
        from skyrl_mtp.models.qwen3_5 import Qwen35Config

        return Qwen35Config.from_hf_config(hf, name=name)
    from skyrl_mtp.models.mimo import MimoConfig

    return MimoConfig.from_hf_config(hf, name=name)


def config_from_pretrained(path: str | Path):
    """The family config of an HF checkpoint directory."""
    return config_from_hf(read_config_json(path), name=str(path))


def num_mtp_layers_in(hf: dict) -> int:
    """MTP layers a config.json declares (MiMo: num_nextn_predict_layers; Qwen3.5: mtp_num_hidden_layers)."""
    text = hf.get("text_config") or {}
    for key in ("num_nextn_predict_layers", "mtp_num_hidden_layers"):
        for d in (hf, text):
            if d.get(key) is not None:
                return int(d[key])
    return 0


def is_mtp_tensor(cfg, name: str) -> bool:
    """Whether an HF tensor name belongs to the MTP head (MiMo: ``model.mtp_layers.*``; Qwen3.5: ``mtp.*``)."""
    own = getattr(cfg, "is_mtp_tensor", None)
    return own(name) if own is not None else ".mtp_layers." in name
