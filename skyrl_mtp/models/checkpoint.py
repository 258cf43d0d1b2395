"""HF checkpoints of the mimo family: random initialisation, saving and loading (safetensors only).

A checkpoint directory holds ``config.json`` (MiMo layout, see ``skyrl_mtp.models.mimo``),
``model.safetensors`` and, for presets with a built-in tokenizer, the tokenizer files.
Weights are read with safetensors only: never pickle.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from skyrl_mtp.models.mimo import MimoConfig


def hf_tensor_shapes(cfg: MimoConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor an HF MiMo checkpoint of `cfg` holds (the single source of truth).

    Other families (``skyrl_mtp.models.qwen3_5``) describe their own tensors: their config has
    ``hf_tensor_shapes()`` / ``is_mtp_tensor()``, and this module defers to them."""
    if hasattr(cfg, "hf_tensor_shapes"):
        return cfg.hf_tensor_shapes()
    h, v, f, d = cfg.hidden_size, cfg.vocab_size, cfg.ffn_hidden_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_query_groups * d

    def decoder_layer(prefix: str) -> dict[str, tuple[int, ...]]:
        return {
            f"{prefix}.input_layernorm.weight": (h,),
            f"{prefix}.self_attn.q_proj.weight": (q, h),
            f"{prefix}.self_attn.q_proj.bias": (q,),
            f"{prefix}.self_attn.k_proj.weight": (kv, h),
            f"{prefix}.self_attn.k_proj.bias": (kv,),
            f"{prefix}.self_attn.v_proj.weight": (kv, h),
            f"{prefix}.self_attn.v_proj.bias": (kv,),
            f"{prefix}.self_attn.o_proj.weight": (h, q),
            f"{prefix}.post_attention_layernorm.weight": (h,),
            f"{prefix}.mlp.gate_proj.weight": (f, h),
            f"{prefix}.mlp.up_proj.weight": (f, h),
            f"{prefix}.mlp.down_proj.weight": (h, f),
        }

    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    for i in range(cfg.num_layers):
        shapes.update(decoder_layer(f"model.layers.{i}"))
    for i in range(cfg.num_mtp_layers):
        p = f"model.mtp_layers.{i}"
        shapes.update({
            f"{p}.token_layernorm.weight": (h,),
            f"{p}.hidden_layernorm.weight": (h,),
            f"{p}.input_proj.weight": (h, 2 * h),
            f"{p}.final_layernorm.weight": (h,),
        })
        shapes.update(decoder_layer(p))
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    return shapes


def random_hf_state_dict(cfg: MimoConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random float32 weights: normal(0, init_std) for matrices, ones for norms, zeros for biases.

    Output projections (o_proj, down_proj) use std / sqrt(2 * layers), as Megatron's
    ``scaled_init_method`` does, so deeper presets start in the same regime Megatron would.
    """
    if hasattr(cfg, "random_hf_state_dict"):
        return cfg.random_hf_state_dict(seed)
    gen = torch.Generator().manual_seed(seed)
    scaled_std = cfg.init_std / (2.0 * max(cfg.num_layers, 1)) ** 0.5
    out = {}
    for name, shape in hf_tensor_shapes(cfg).items():
        if name.endswith("norm.weight"):
            out[name] = torch.ones(shape)
        elif name.endswith(".bias"):
            out[name] = torch.zeros(shape)
        else:
            std = scaled_std if (".o_proj." in name or ".down_proj." in name) else cfg.init_std
            out[name] = torch.randn(shape, generator=gen) * std
    return out


def validate_hf_state_dict(cfg: MimoConfig, state: dict[str, torch.Tensor], *, require_mtp: bool, source: str) -> None:
    """Raises ValueError naming the first missing or mis-shaped tensor (before any model is built)."""
    expected = hf_tensor_shapes(cfg)
    if require_mtp and cfg.num_mtp_layers < 1:
        raise ValueError(f"{source}: MTP was requested but config.json has num_nextn_predict_layers=0 "
                         "(mtp_num_hidden_layers=0 for qwen3_5); "
                         "use a checkpoint with MTP layers or disable MTP (trainer.mtp.enabled=false)")
    is_mtp = getattr(cfg, "is_mtp_tensor", lambda k: ".mtp_layers." in k)
    if not require_mtp:
        expected = {k: s for k, s in expected.items() if not is_mtp(k)}
    missing = sorted(set(expected) - set(state))
    if missing:
        mtp_missing = [k for k in missing if is_mtp(k)]
        hint = (" (the checkpoint has no MTP tensors; MTP needs them)" if mtp_missing and len(mtp_missing) == len(missing)
                else "")
        raise ValueError(f"{source}: missing tensor {missing[0]!r}{hint}; {len(missing)} missing in total")
    for name, shape in expected.items():
        got = tuple(state[name].shape)
        if got != shape:
            raise ValueError(f"{source}: tensor {name!r} has shape {got}, expected {shape} for this config")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "chat_template.jinja")


def save_hf_checkpoint(cfg: MimoConfig, state: dict[str, torch.Tensor], out_dir: str | Path,
                       torch_dtype: str = "float32", tokenizer_from: str | Path | None = None) -> Path:
    """Writes config.json + model.safetensors (+ tokenizer) atomically: a temp dir renamed into place.

    The tokenizer is the built-in one for presets that have it, else copied from `tokenizer_from`.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    validate_hf_state_dict(cfg, state, require_mtp=cfg.num_mtp_layers > 0, source=str(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    dtype = getattr(torch, torch_dtype)
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(cfg.to_hf_config(torch_dtype), indent=2))
    if cfg.tokenizer == "tiny":
        from skyrl_mtp.models.tokenizer import save_tiny_tokenizer

        save_tiny_tokenizer(tmp, model_max_length=cfg.max_position_embeddings)
    elif tokenizer_from is not None:
        import shutil

        for name in TOKENIZER_FILES:
            if (Path(tokenizer_from) / name).is_file():
                shutil.copy2(Path(tokenizer_from) / name, tmp / name)
    (tmp / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id}))
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        _rmtree(old)
    else:
        tmp.rename(out)
    return out


def load_hf_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF checkpoint directory (one or several .safetensors files)."""
    from safetensors.torch import load_file

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {path}: only safetensors checkpoints are loaded")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
