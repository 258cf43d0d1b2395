"""The `mimo` model family: a Qwen2 decoder plus N MTP layers, in the layout vLLM drafts with.

This module owns the architecture description (:class:`MimoConfig`), its presets, and the
HF ``config.json`` it maps to. It imports neither Megatron nor vLLM: the Megatron side is in
``skyrl_mtp.megatron.model_builder``, the HF <-> Megatron tensor names in
``skyrl_mtp.megatron.bridge``.

HF layout (what vLLM's ``MiMoForCausalLM`` / ``MiMoMTP`` and transformers' ``Qwen2ForCausalLM``
load without remote code): ``"model_type": "qwen2"``, ``"architectures": ["MiMoForCausalLM"]``,
``"num_nextn_predict_layers": N``; MTP layer i holds ``model.mtp_layers.{i}.{token_layernorm,
hidden_layernorm,final_layernorm}.weight``, ``input_proj.weight`` ([H, 2H] applied to
``cat(hidden, embed)``) and one Qwen2 decoder layer's tensors. transformers ignores the MTP
tensors; vLLM's drafter uses them, sharing ``embed_tokens`` and ``lm_head`` with the target.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from skyrl_mtp.models.hf_config import first_token_id, read_config_json

# Special token ids of the tiny tokenizer (skyrl_mtp.models.tokenizer builds it with these).
TINY_PAD_ID, TINY_BOS_ID, TINY_EOS_ID, TINY_UNK_ID = 0, 1, 2, 3


@dataclass(frozen=True)
class MimoConfig:
    """Architecture of one MiMo-style model. Field names follow Megatron where they differ."""

    name: str
    vocab_size: int  # rows of embed_tokens / lm_head in the HF checkpoint (may exceed the tokenizer)
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int  # = HF num_key_value_heads (GQA)
    ffn_hidden_size: int  # = HF intermediate_size (SwiGLU)
    num_mtp_layers: int = 1  # = HF num_nextn_predict_layers
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    init_std: float = 0.02
    bos_token_id: int = TINY_BOS_ID
    eos_token_id: int = TINY_EOS_ID
    pad_token_id: int = TINY_PAD_ID
    tokenizer: str | None = None  # "tiny": the built-in tokenizer; None: shipped with the checkpoint

    def __post_init__(self) -> None:
        checks = {
            "hidden_size % num_attention_heads": self.hidden_size % self.num_attention_heads,
            "num_attention_heads % num_query_groups": self.num_attention_heads % self.num_query_groups,
        }
        for what, rest in checks.items():
            if rest:
                raise ValueError(f"MimoConfig {self.name!r}: {what} must be 0, got remainder {rest}")
        for field in ("vocab_size", "hidden_size", "num_layers", "ffn_hidden_size"):
            if getattr(self, field) < 1:
                raise ValueError(f"MimoConfig {self.name!r}: {field} must be >= 1, got {getattr(self, field)}")
        if self.num_mtp_layers < 0:
            raise ValueError(f"MimoConfig {self.name!r}: num_mtp_layers must be >= 0, got {self.num_mtp_layers}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def replace(self, **changes) -> "MimoConfig":
        return dataclasses.replace(self, **changes)

    def to_hf_config(self, torch_dtype: str = "float32") -> dict:
        """The HF config.json (MiMo layout) for this architecture."""
        return {
            "architectures": ["MiMoForCausalLM"],
            "model_type": "qwen2",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.ffn_hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_query_groups,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "tie_word_embeddings": self.tie_word_embeddings,
            "num_nextn_predict_layers": self.num_mtp_layers,
            "attention_dropout": 0.0,
            "use_sliding_window": False,
            "initializer_range": self.init_std,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": torch_dtype,
        }

    @classmethod
    def from_hf_config(cls, hf: dict, name: str = "hf") -> "MimoConfig":
        """Reads a MiMo/Qwen2 config.json (e.g. a real MiMo-7B-RL checkpoint)."""
        missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                               "intermediate_size") if k not in hf]
        if missing:
            raise ValueError(f"config.json of {name!r} lacks {missing}: not a Qwen2/MiMo config")
        rope = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta") or 10000.0
        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
        if head_dim * heads != hf["hidden_size"]:
            raise ValueError(f"{name!r}: head_dim*num_attention_heads != hidden_size is not supported")
        return cls(
            name=name,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_query_groups=hf.get("num_key_value_heads", heads),
            ffn_hidden_size=hf["intermediate_size"],
            num_mtp_layers=hf.get("num_nextn_predict_layers", 0),
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            rope_theta=float(rope),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            init_std=hf.get("initializer_range", 0.02),
            bos_token_id=hf.get("bos_token_id") if hf.get("bos_token_id") is not None else TINY_BOS_ID,
            eos_token_id=first_token_id(hf.get("eos_token_id"), TINY_EOS_ID),
            pad_token_id=hf.get("pad_token_id") if hf.get("pad_token_id") is not None else TINY_PAD_ID,
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "MimoConfig":
        return cls.from_hf_config(read_config_json(path), name=str(path))


PRESETS: dict[str, MimoConfig] = {
    # CPU demo size: 2 layers, hidden 128 (head_dim 32, which vLLM's CPU attention supports).
    # Vocab 512 covers the tiny tokenizer (384 tokens) with room to grow; a multiple of 128.
    "tiny": MimoConfig(
        name="tiny", vocab_size=512, hidden_size=128, num_layers=2, num_attention_heads=4,
        num_query_groups=2, ffn_hidden_size=384, num_mtp_layers=1, max_position_embeddings=512,
        rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, tokenizer="tiny",
    ),
    # The tiny model scaled to ~0.5B (trunk 0.49B + a 29M MTP layer), same tokenizer and task:
    # the one-GPU end-to-end run (examples/train/spec_decode/small_gpu_dapo.sh).
    "small": MimoConfig(
        name="small", vocab_size=512, hidden_size=1536, num_layers=20, num_attention_heads=12,
        num_query_groups=2, ffn_hidden_size=4096, num_mtp_layers=1, max_position_embeddings=512,
        rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, tokenizer="tiny",
    ),
    # MiMo-7B-RL shapes (XiaomiMiMo/MiMo-7B-RL config.json); weights come from a checkpoint.
    "mimo_7b": MimoConfig(
        name="mimo_7b", vocab_size=151680, hidden_size=4096, num_layers=36, num_attention_heads=32,
        num_query_groups=8, ffn_hidden_size=11008, num_mtp_layers=1, max_position_embeddings=32768,
        rope_theta=640000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=151643, eos_token_id=151645, pad_token_id=151643,
    ),
    # MiMo-7B-RL's shapes (vocabulary rows included) with random weights and the built-in tokenizer:
    # memory and step-time rehearsals of the 7B recipes without the checkpoint (sort task).
    "mimo_7b_shapes": MimoConfig(
        name="mimo_7b_shapes", vocab_size=151680, hidden_size=4096, num_layers=36, num_attention_heads=32,
        num_query_groups=8, ffn_hidden_size=11008, num_mtp_layers=1, max_position_embeddings=32768,
        rope_theta=640000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, tokenizer="tiny",
    ),
}


def get_preset(name: str) -> MimoConfig:
    """The preset called `name`; a clear error listing the known ones otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; known presets: {sorted(PRESETS)}") from None
