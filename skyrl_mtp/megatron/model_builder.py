"""Builds the Megatron modules of a mimo model: the policy trunk and, separately, its MTP head.

Why two modules: the trunk is a GPTModel built *without* an MTP block, so Megatron's native
in-forward MTP loss (0.16 inline, 0.17-0.18 ``process_mtp_loss``, 0.19 labels from input_ids)
has nothing to run on, on every version. The head is a ``MultiTokenPredictionBlock`` of its
own, with its own config, parameters, gradient buffer and optimizer, replayed on the detached
trunk by ``skyrl_mtp.mtp.replay``. Parameter names stay Megatron's (``mtp.layers.{i}.*``).

:func:`build_native_gpt_with_mtp` builds Megatron's own GPTModel + MTP block; it exists only as
the reference the replay is checked against.
"""

from __future__ import annotations

import importlib.util

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from skyrl_mtp.models.mimo import MimoConfig


@dataclass(frozen=True)
class BuildOptions:
    """How to lay a model out: parallelism, dtype and layer implementation."""

    tp_size: int = 1
    pp_size: int = 1
    params_dtype: torch.dtype = torch.float32
    use_te: bool | None = None  # None: TransformerEngine when installed and CUDA is present
    sequence_parallel: bool = False
    make_vocab_size_divisible_by: int = 128
    recompute: str = "none"  # none | selective | full: see RECOMPUTE
    # Micro-batches arrive packed (THD, megatron.max_tokens_per_microbatch): the local spec's
    # attention must then respect sequence boundaries (skyrl_mtp.megatron.packed_attention).
    packed: bool = False


# megatron.recompute -> Megatron TransformerConfig fields. selective: the core attention
# (softmax(QK^T)V, the activation that grows with sequence^2) is recomputed in backward, the rest is
# stored; full: only each transformer layer's input is stored and the whole layer re-runs in
# backward (uniform method, one layer per checkpoint unit). The MTP head takes selective under
# full: Megatron's full recompute of an MTP layer is a reentrant checkpoint of its inputs, and the
# decoupled head's inputs (detached trunk hidden states and embeddings) carry no gradient, so the
# checkpoint's output would carry none either and the head would silently stop training.
RECOMPUTE = {
    "none": {},
    "selective": {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]},
    "full": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
}


def padded_vocab_size(vocab_size: int, tp_size: int, divisible_by: int = 128) -> int:
    """Megatron's vocab padding: the next multiple of divisible_by * tp_size."""
    multiple = divisible_by * tp_size
    return -(-vocab_size // multiple) * multiple


def resolve_use_te(requested: bool | None) -> bool:
    """TransformerEngine is optional: imported lazily, and a clear error if asked for but absent."""
    try:
        import transformer_engine  # noqa: F401

        available = torch.cuda.is_available()
    except ImportError:
        available = False
    if requested and not available:
        raise RuntimeError("use_te=True but TransformerEngine (with CUDA) is not available; "
                           "install the 'gpu' extra on a CUDA machine or set use_te=false (local spec)")
    return available if requested is None else requested


def transformer_config(cfg: MimoConfig, opts: BuildOptions, *, mtp_layers: int | None = None):
    """Megatron TransformerConfig of a Qwen2 decoder (RMSNorm, SwiGLU, GQA, QKV bias, RoPE)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    on_cpu = not torch.cuda.is_available()
    kwargs = dict(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        kv_channels=cfg.head_dim,
        ffn_hidden_size=cfg.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=cfg.init_std,
        params_dtype=opts.params_dtype,
        bf16=opts.params_dtype == torch.bfloat16,
        fp16=opts.params_dtype == torch.float16,
        tensor_model_parallel_size=opts.tp_size,
        pipeline_model_parallel_size=opts.pp_size,
        # What stages send each other (hidden states and their gradients), and, because a rank's
        # last micro-batch may have fewer rows than the others, shapes sent ahead of each tensor.
        pipeline_dtype=opts.params_dtype,
        variable_seq_lengths=opts.pp_size > 1,
        # Megatron refuses variable shapes with the allgather MoE dispatcher even for a dense model
        # (no dispatcher is ever built here); name the one it accepts.
        moe_token_dispatcher_type="alltoall",
        sequence_parallel=opts.sequence_parallel,
        mtp_num_layers=mtp_layers,
        # Fused kernels are CUDA-only; on CPU everything runs unfused.
        bias_activation_fusion=not on_cpu,
        bias_dropout_fusion=not on_cpu,
        # The fused kernel is a compiled extension (scaled_masked_softmax_cuda) that plain
        # megatron-core wheels do not ship: use it only where it is importable.
        masked_softmax_fusion=not on_cpu and importlib.util.find_spec("scaled_masked_softmax_cuda") is not None,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        use_cpu_initialization=on_cpu,
    )
    if opts.recompute not in RECOMPUTE:
        raise ValueError(f"megatron.recompute={opts.recompute!r}: use one of {list(RECOMPUTE)}")
    kwargs.update(RECOMPUTE[opts.recompute])
    from skyrl_mtp.megatron.compat import has_mtp_detach_heads

    if mtp_layers and has_mtp_detach_heads():
        # The head never sends gradient into the trunk (we also replay on a detached trunk).
        kwargs["mtp_detach_heads"] = True
    return TransformerConfig(**kwargs)


def layer_spec(use_te: bool, packed: bool = False):
    """TE's layer spec (its attention takes packed THD input natively) or Megatron's local one
    (with packed input: the packing-aware core attention)."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    if use_te:
        return get_gpt_layer_with_transformer_engine_spec()
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    if packed:
        from skyrl_mtp.megatron.packed_attention import with_packed_attention

        spec = with_packed_attention(spec)
    return spec


def _gpt_kwargs(cfg: MimoConfig, opts: BuildOptions) -> dict:
    return dict(
        vocab_size=padded_vocab_size(cfg.vocab_size, opts.tp_size, opts.make_vocab_size_divisible_by),
        max_sequence_length=cfg.max_position_embeddings,
        position_embedding_type="rope",
        rotary_base=int(cfg.rope_theta),
        rotary_percent=1.0,
        share_embeddings_and_output_weights=cfg.tie_word_embeddings,
        parallel_output=True,
    )


def build_device() -> torch.device:
    """Where models are built: the current CUDA device, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _on_build_device(module, params_dtype: torch.dtype | None = None):
    # Megatron creates most parameters on the current CUDA device, but without Apex/TE its norm
    # fallback (torch.nn.RMSNorm) is created on the CPU in float32: a module must be on one device,
    # and in one parameter dtype, as TE's layer spec builds it (Megatron's optimizer offload refuses
    # a bf16 model with fp32 parameters: their shards would be views it cannot optimize).
    module = module.to(build_device())
    if params_dtype is None:
        return module
    with torch.no_grad():
        for param in module.parameters():
            if param.is_floating_point() and param.dtype != params_dtype:
                param.data = param.data.to(params_dtype)
    return module


def build_trunk(cfg: MimoConfig, opts: BuildOptions = BuildOptions(), *, pre_process: bool = True,
                post_process: bool = True):
    """The policy: a GPTModel without MTP block, with the output_processor keywords."""
    if getattr(cfg, "family", "mimo") == "qwen3_5":  # the hybrid has its own layer spec
        from skyrl_mtp.megatron import qwen3_5

        _refuse_recompute(opts)
        _refuse_packing(opts)
        return qwen3_5.build_trunk(cfg, opts, pre_process=pre_process, post_process=post_process)
    from skyrl_mtp.megatron.compat import check_supported
    from skyrl_mtp.megatron.output_processor import gpt_model_class

    check_supported()
    config = transformer_config(cfg, opts, mtp_layers=None)
    model = gpt_model_class()(config=config, transformer_layer_spec=layer_spec(resolve_use_te(opts.use_te), opts.packed),
                              pre_process=pre_process, post_process=post_process, **_gpt_kwargs(cfg, opts))
    model = _on_build_device(model, opts.params_dtype)
    if getattr(model, "mtp_process", False) or model.config.mtp_num_layers:
        raise AssertionError("trunk was built with an MTP block; the native MTP loss could reach the policy")
    return model


def build_mtp_block(cfg: MimoConfig, opts: BuildOptions = BuildOptions()):
    """The draft head: Megatron's MultiTokenPredictionBlock with cfg.num_mtp_layers layers."""
    if getattr(cfg, "family", "mimo") == "qwen3_5":
        from skyrl_mtp.megatron import qwen3_5

        _refuse_recompute(opts)
        _refuse_packing(opts)
        return qwen3_5.build_mtp_block(cfg, opts)
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec
    from megatron.core.transformer.multi_token_prediction import MultiTokenPredictionBlock

    if cfg.num_mtp_layers < 1:
        raise ValueError(f"model {cfg.name!r} has num_mtp_layers=0: it has no MTP head to build")
    if opts.sequence_parallel:
        raise ValueError("MTP head replay with sequence_parallel=True is not implemented: set it false")
    use_te = resolve_use_te(opts.use_te)
    if opts.recompute == "full":  # see RECOMPUTE
        opts = with_options(opts, recompute="selective")
    config = transformer_config(cfg, opts, mtp_layers=cfg.num_mtp_layers)
    spec = get_gpt_mtp_block_spec(config, layer_spec(use_te, opts.packed), use_transformer_engine=use_te)
    return _on_build_device(MultiTokenPredictionBlock(config=config, spec=spec), opts.params_dtype)


def build_head_embedding(cfg: MimoConfig, opts: BuildOptions = BuildOptions()):
    """A frozen copy of the trunk's word embedding for the MTP head on the last pipeline stage
    (pp_size > 1), where the trunk has none: the head re-embeds the shifted tokens with it.
    Refreshed from the first stage after every policy step (skyrl_mtp.megatron.pipeline)."""
    from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding

    config = transformer_config(cfg, opts, mtp_layers=None)
    embedding = LanguageModelEmbedding(config=config, vocab_size=_gpt_kwargs(cfg, opts)["vocab_size"],
                                       max_sequence_length=cfg.max_position_embeddings,
                                       position_embedding_type="rope")
    embedding.requires_grad_(False)
    return _on_build_device(embedding)


def build_native_gpt_with_mtp(cfg: MimoConfig, opts: BuildOptions = BuildOptions()):
    """Megatron's own GPTModel with its MTP block (the reference for replay parity tests)."""
    if getattr(cfg, "family", "mimo") == "qwen3_5":
        from skyrl_mtp.megatron import qwen3_5

        return qwen3_5.build_native_gpt_with_mtp(cfg, opts)
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec

    use_te = resolve_use_te(opts.use_te)
    config = transformer_config(cfg, opts, mtp_layers=cfg.num_mtp_layers)
    spec = layer_spec(use_te)
    mtp_spec = get_gpt_mtp_block_spec(config, spec, use_transformer_engine=use_te)
    return _on_build_device(GPTModel(config=config, transformer_layer_spec=spec, mtp_block_spec=mtp_spec,
                                     **_gpt_kwargs(cfg, opts)), opts.params_dtype)


def _refuse_recompute(opts: BuildOptions) -> None:
    if opts.recompute != "none":  # its own TransformerConfig does not take RECOMPUTE's fields yet
        raise ValueError(f"megatron.recompute={opts.recompute!r} is not wired into the qwen3_5 family: use none")


def _refuse_packing(opts: BuildOptions) -> None:
    if opts.packed:  # Megatron's Gated DeltaNet has no THD path: its recurrence would run across sequences
        raise ValueError("megatron.max_tokens_per_microbatch (sequence packing) is not supported by the qwen3_5 "
                         "family (its Gated DeltaNet layers have no packed-sequence path): set it null")


def causal_mask(seq_len: int, device=None) -> torch.Tensor:
    """Megatron's boolean mask convention (True = masked), passed explicitly: its default
    mask is created on CUDA."""
    return torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool, device=device), diagonal=1)[None, None]


def with_options(opts: BuildOptions, **changes) -> BuildOptions:
    return dataclasses.replace(opts, **changes)
