"""Megatron side of the `qwen3_5` family: layer spec (Gated DeltaNet / gated full attention / MTP)
and the HF <-> Megatron state-dict adapter.

Layer spec. A ``TransformerBlockSubmodules`` with one ``TransformerLayer`` spec per layer, following
``cfg.layer_types``:
- full attention: Megatron's ``SelfAttention`` with ``attention_output_gate=True`` (the gate rows
  live in ``linear_qkv``: per query group ``[q heads | gate heads | k | v]``), ``q_layernorm`` /
  ``k_layernorm`` per head, RoPE on ``rotary_percent = partial_rotary_factor`` of each head (Megatron's
  rotate-half RoPE on the leading dims = HF's partial RoPE; for text the interleaved M-RoPE of the
  HF config degenerates to it because the three position rows are equal).
- linear attention: :class:`TorchGatedDeltaNet`, parameter-for-parameter Megatron's
  ``megatron.core.ssm.gated_delta_net.GatedDeltaNet`` (``in_proj`` = ``[q k v | z | b | a]``,
  ``conv1d``, ``dt_bias``, ``A_log``, ``out_norm``, ``out_proj``), whose recurrence is Megatron's own
  ``torch_chunk_gated_delta_rule``. Why not Megatron's class itself: it refuses to build without
  ``fla`` (flash-linear-attention, Triton kernels, not on the CPU stack) and uses fla's Triton
  ``l2norm`` even on its torch path. Where fla and CUDA are present, :func:`gdn_module` returns
  Megatron's class instead (same parameter names and layout, so checkpoints and the bridge are shared).
- norms: Qwen3.5's decoder norms are zero-centred (``x_hat * (1 + w)``, computed in float32);
  Megatron's torch-norm fallback refuses ``layernorm_zero_centered_gamma``, so :class:`ZeroCenteredRMSNorm`
  is used for ``input_layernorm``, ``pre_mlp_layernorm``, q/k norms, the final norm and the MTP norms;
  the GDN output norm is a plain (gated) RMSNorm (:class:`PlainRMSNorm`).
- MTP: Megatron's ``MultiTokenPredictionBlock`` whose layer holds a full-attention layer; HF keeps a
  single ``mtp.fc`` / ``pre_fc_norm_*`` / ``norm`` for all MTP layers, so only ``num_mtp_layers == 1``
  maps one to one (others are refused).

Scope: tensor parallel 1, no sequence parallel, no packed sequences (GDN state in Megatron has no
THD path); each refused with the fix.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from skyrl_mtp.models.qwen3_5 import FULL, Qwen35Config


# ---------------------------------------------------------------------------------------- norms
class ZeroCenteredRMSNorm(torch.nn.Module):
    """Qwen3.5's decoder RMSNorm: ``(x_hat * (1 + w))`` in float32, cast back; ``w`` starts at 0."""

    def __init__(self, config=None, hidden_size: int = 0, eps: float = 1e-6, **_):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.zeros(hidden_size, dtype=getattr(config, "params_dtype", torch.float32)))
        # Replicated over TP ranks; Megatron's grad all-reduce of layer norms keys on this attribute.
        self.weight.sequence_parallel = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.weight.float())).to(x.dtype)


class PlainRMSNorm(torch.nn.Module):
    """The GDN output norm (HF ``RMSNormGated`` before its gate): ``w * x_hat``, ``w`` starts at 1."""

    def __init__(self, config=None, hidden_size: int = 0, eps: float = 1e-6, **_):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=getattr(config, "params_dtype", torch.float32)))
        self.weight.sequence_parallel = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return self.weight * y


def _l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    # fla's / HF's l2norm: x / sqrt(sum(x^2) + eps), over the head dim.
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


# ---------------------------------------------------------------------------------------- GDN
def _gdn_base():
    from megatron.core.transformer.module import MegatronModule

    return MegatronModule


class TorchGatedDeltaNet(_gdn_base()):
    """Gated DeltaNet with Megatron's parameters and math, no fla: the CPU path.

    Input/output ``[s, b, h]``; returns ``(out, bias)`` like every Megatron attention module.
    """

    def __init__(self, config, submodules=None, layer_number: int | None = None, pg_collection=None, **_):
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        super().__init__(config)
        tp = getattr(getattr(pg_collection, "tp", None), "size", lambda: 1)()
        if tp != 1 or config.sequence_parallel:
            raise ValueError(f"qwen3_5 Gated DeltaNet layers are built for tensor parallel 1 without sequence "
                             f"parallel (got tp={tp}, sequence_parallel={config.sequence_parallel}): set "
                             "megatron.tp_size=1 and megatron.sequence_parallel=false for this family")
        self.layer_number = layer_number
        self.act_fn = config.activation_func
        self.key_head_dim = config.linear_key_head_dim
        self.value_head_dim = config.linear_value_head_dim
        self.num_key_heads = config.linear_num_key_heads
        self.num_value_heads = config.linear_num_value_heads
        self.qk_dim = self.key_head_dim * self.num_key_heads
        self.v_dim = self.value_head_dim * self.num_value_heads
        self.in_proj_dim = self.qk_dim * 2 + self.v_dim * 2 + self.num_value_heads * 2
        self.conv_dim = self.qk_dim * 2 + self.v_dim
        tp_group = getattr(pg_collection, "tp", None)
        self.in_proj = ColumnParallelLinear(
            config.hidden_size, self.in_proj_dim, config=config, init_method=config.init_method,
            gather_output=False, bias=False, skip_bias_add=False, is_expert=False, tp_group=tp_group)
        self.conv1d = torch.nn.Conv1d(self.conv_dim, self.conv_dim, bias=False, kernel_size=config.linear_conv_kernel_dim,
                                      groups=self.conv_dim, padding=config.linear_conv_kernel_dim - 1,
                                      dtype=config.params_dtype)
        self.dt_bias = torch.nn.Parameter(torch.ones(self.num_value_heads, dtype=config.params_dtype))
        self.A_log = torch.nn.Parameter(torch.empty(self.num_value_heads, dtype=config.params_dtype).uniform_(1, 16).log_())
        for p in (self.conv1d.weight, self.dt_bias, self.A_log):
            p.tensor_model_parallel = True  # as Megatron's GatedDeltaNet marks them (trivially true at TP 1)
            p.partition_dim = 0
        self.out_norm = PlainRMSNorm(config, self.value_head_dim, eps=config.layernorm_epsilon)
        self.out_proj = RowParallelLinear(
            self.v_dim, config.hidden_size, config=config, init_method=config.output_layer_init_method,
            bias=False, input_is_parallel=True, skip_bias_add=True, is_expert=False, tp_group=tp_group)

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, inference_context=None,
                packed_seq_params=None, **_):
        from megatron.core.ssm.gated_delta_net import torch_chunk_gated_delta_rule

        if packed_seq_params is not None:
            raise ValueError("qwen3_5: packed sequences (THD) are not supported by the Gated DeltaNet layers; "
                             "use padded [b, s] batches")
        if inference_context is not None:
            raise ValueError("qwen3_5: Megatron inference contexts are not supported (generation runs in vLLM)")
        seq_len, batch, _ = hidden_states.shape
        qkvzba, _ = self.in_proj(hidden_states)
        qkvzba = qkvzba.transpose(0, 1)  # [b, s, *]
        qkv, gate, beta, alpha = torch.split(
            qkvzba, [self.conv_dim, self.v_dim, self.num_value_heads, self.num_value_heads], dim=-1)
        # Causal depthwise conv over time (left padding K-1, keep the first s outputs), then SiLU.
        qkv = self.act_fn(self.conv1d(qkv.transpose(1, 2).contiguous())[..., :seq_len]).transpose(1, 2)
        query, key, value = torch.split(qkv, [self.qk_dim, self.qk_dim, self.v_dim], dim=-1)
        query = _l2norm(query.reshape(batch, seq_len, -1, self.key_head_dim))
        key = _l2norm(key.reshape(batch, seq_len, -1, self.key_head_dim))
        value = value.reshape(batch, seq_len, -1, self.value_head_dim)
        rep = self.num_value_heads // self.num_key_heads
        if rep > 1:
            query = query.repeat_interleave(rep, dim=2)
            key = key.repeat_interleave(rep, dim=2)
        g = -self.A_log.float().exp() * F.softplus(alpha.float() + self.dt_bias)
        out, _ = torch_chunk_gated_delta_rule(
            query.contiguous(), key.contiguous(), value.contiguous(), g=g, beta=beta.sigmoid().contiguous(),
            initial_state=None, output_final_state=False, use_qk_l2norm_in_kernel=False)
        x = out.reshape(-1, self.value_head_dim)
        y = self.out_norm(x) * self.act_fn(gate.reshape(-1, self.value_head_dim).float())
        y = y.to(out.dtype).reshape(batch, seq_len, -1).transpose(0, 1).contiguous()
        return self.out_proj(y)


def gdn_module():
    """Megatron's fla-backed GatedDeltaNet where fla and CUDA are present and fla's backward can
    run, else :class:`TorchGatedDeltaNet` (the same math in torch, slower)."""
    if torch.cuda.is_available() and importlib.util.find_spec("fla") is not None:
        from megatron.core.ssm.gated_delta_net import HAVE_FLA, GatedDeltaNet

        if HAVE_FLA and fla_backward_usable():
            return GatedDeltaNet
    return TorchGatedDeltaNet


def fla_backward_usable() -> bool:
    """False on Hopper with Triton >= 3.4.0 and < 3.7.1: fla 0.5 refuses its gated chunk backward
    there (wrong results, fla issue #640) and raises mid-step, so the layer falls back to the torch
    path at build time instead, with a warning naming the fix (seen on an H200 with Triton 3.6)."""
    import warnings

    import triton
    from packaging.version import Version

    hopper = torch.cuda.get_device_capability()[0] == 9
    triton_version = Version(triton.__version__.split("+")[0])
    if hopper and Version("3.4.0") <= triton_version < Version("3.7.1"):
        warnings.warn(f"qwen3_5: fla's Gated DeltaNet backward is refused on Hopper with Triton {triton.__version__} "
                      "(fla issue #640); using the torch Gated DeltaNet instead (slower). Install triton>=3.7.1 "
                      "for fla's kernels", stacklevel=2)
        return False
    return True


def gdn_spec():
    """The linear-attention layer's spec. Megatron's GatedDeltaNet builds its projections and its
    output norm from submodules (plain linears here: the layer's input norm stays the
    TransformerLayer's, so the parameter names are the CPU path's); ours builds its own."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.spec_utils import ModuleSpec

    module = gdn_module()
    if module is TorchGatedDeltaNet:
        return ModuleSpec(module=module, submodules=None)
    from megatron.core.ssm.gated_delta_net import GatedDeltaNetSubmodules

    return ModuleSpec(module=module, submodules=GatedDeltaNetSubmodules(
        in_proj=ColumnParallelLinear, out_norm=PlainRMSNorm, out_proj=RowParallelLinear))


# ---------------------------------------------------------------------------------------- specs
def transformer_config(cfg: Qwen35Config, opts, *, mtp_layers: int | None = None):
    """Megatron TransformerConfig of the hybrid (no biases, SwiGLU, GQA, qk norms, output gate)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    from skyrl_mtp.megatron.compat import has_mtp_detach_heads

    if opts.tp_size != 1 or opts.sequence_parallel:
        raise ValueError(f"model family qwen3_5 runs with tensor parallel 1 and no sequence parallel (got "
                         f"tp_size={opts.tp_size}, sequence_parallel={opts.sequence_parallel}); set megatron.tp_size=1")
    on_cpu = not torch.cuda.is_available()
    kwargs = dict(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups, kv_channels=cfg.head_dim, ffn_hidden_size=cfg.ffn_hidden_size,
        normalization="RMSNorm", layernorm_epsilon=cfg.rms_norm_eps, gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, add_qkv_bias=False, qk_layernorm=True,
        attention_output_gate=True, hidden_dropout=0.0, attention_dropout=0.0, init_method_std=cfg.init_std,
        params_dtype=opts.params_dtype, bf16=opts.params_dtype == torch.bfloat16,
        fp16=opts.params_dtype == torch.float16, tensor_model_parallel_size=1,
        pipeline_model_parallel_size=opts.pp_size, sequence_parallel=False, mtp_num_layers=mtp_layers,
        linear_conv_kernel_dim=cfg.linear_conv_kernel_dim, linear_key_head_dim=cfg.linear_key_head_dim,
        linear_value_head_dim=cfg.linear_value_head_dim, linear_num_key_heads=cfg.linear_num_key_heads,
        linear_num_value_heads=cfg.linear_num_value_heads,
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        apply_rope_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False,
        use_cpu_initialization=on_cpu,
    )
    if mtp_layers and has_mtp_detach_heads():
        kwargs["mtp_detach_heads"] = True
    return TransformerConfig(**kwargs)


def _layer_spec(kind: str, use_te: bool):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    if use_te:
        raise ValueError("model family qwen3_5: the TransformerEngine layer spec is not wired yet; set "
                         "megatron.use_te=false (local spec)")
    base = get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=True)
    sub = base.submodules
    if kind == FULL:
        attn = sub.self_attention
        attn.submodules.q_layernorm = ZeroCenteredRMSNorm
        attn.submodules.k_layernorm = ZeroCenteredRMSNorm
    else:
        attn = gdn_spec()
    return ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
        input_layernorm=ZeroCenteredRMSNorm, self_attention=attn, self_attn_bda=sub.self_attn_bda,
        pre_mlp_layernorm=ZeroCenteredRMSNorm, mlp=sub.mlp, mlp_bda=sub.mlp_bda))


def block_spec(cfg: Qwen35Config, use_te: bool = False):
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    return TransformerBlockSubmodules(layer_specs=[_layer_spec(k, use_te) for k in cfg.layer_types],
                                      layer_norm=ZeroCenteredRMSNorm)


def mtp_block_spec(cfg: Qwen35Config, use_te: bool = False):
    from megatron.core.tensor_parallel import ColumnParallelLinear
    from megatron.core.transformer.multi_token_prediction import (
        MultiTokenPredictionBlockSubmodules,
        MultiTokenPredictionLayer,
        MultiTokenPredictionLayerSubmodules,
    )
    from megatron.core.transformer.spec_utils import ModuleSpec

    from skyrl_mtp.megatron.bridge import mtp_submodule_name

    layer = {mtp_submodule_name(): _layer_spec(FULL, use_te)}
    spec = ModuleSpec(module=MultiTokenPredictionLayer, submodules=MultiTokenPredictionLayerSubmodules(
        enorm=ZeroCenteredRMSNorm, hnorm=ZeroCenteredRMSNorm, eh_proj=ColumnParallelLinear,
        layer_norm=ZeroCenteredRMSNorm, **layer))
    return MultiTokenPredictionBlockSubmodules(layer_specs=[spec] * cfg.num_mtp_layers)


def _gpt_kwargs(cfg: Qwen35Config, opts) -> dict:
    from skyrl_mtp.megatron.model_builder import padded_vocab_size

    return dict(vocab_size=padded_vocab_size(cfg.vocab_size, 1, opts.make_vocab_size_divisible_by),
                max_sequence_length=cfg.max_position_embeddings, position_embedding_type="rope",
                rotary_base=int(cfg.rope_theta), rotary_percent=cfg.partial_rotary_factor,
                share_embeddings_and_output_weights=cfg.tie_word_embeddings, parallel_output=True)


def _on_device(module, params_dtype: torch.dtype):
    """Model on the build device, every floating parameter in params_dtype (this family's norms are
    plain torch modules created on the CPU in float32)."""
    from skyrl_mtp.megatron.model_builder import build_device

    module = module.to(build_device())
    with torch.no_grad():
        for param in module.parameters():
            if param.is_floating_point() and param.dtype != params_dtype:
                param.data = param.data.to(params_dtype)
    return module


def _check_mtp(cfg: Qwen35Config) -> None:
    if cfg.num_mtp_layers != 1:
        raise ValueError(f"model {cfg.name!r}: qwen3_5 supports exactly one MTP layer (HF keeps one mtp.fc and "
                         f"norms for all), got mtp_num_hidden_layers={cfg.num_mtp_layers}")


def build_trunk(cfg: Qwen35Config, opts, *, pre_process: bool = True, post_process: bool = True):
    """The policy: a GPTModel of the hybrid without MTP block (see model_builder.build_trunk)."""
    from skyrl_mtp.megatron.compat import check_supported
    from skyrl_mtp.megatron.model_builder import resolve_use_te
    from skyrl_mtp.megatron.output_processor import gpt_model_class

    check_supported()
    config = transformer_config(cfg, opts, mtp_layers=None)
    model = gpt_model_class()(config=config, transformer_layer_spec=block_spec(cfg, resolve_use_te(opts.use_te)),
                              pre_process=pre_process, post_process=post_process, **_gpt_kwargs(cfg, opts))
    if getattr(model, "mtp_process", False) or model.config.mtp_num_layers:
        raise AssertionError("trunk was built with an MTP block; the native MTP loss could reach the policy")
    return _on_device(model, opts.params_dtype)


def build_mtp_block(cfg: Qwen35Config, opts):
    """The draft head: a MultiTokenPredictionBlock whose layer is a gated full-attention layer."""
    from megatron.core.transformer.multi_token_prediction import MultiTokenPredictionBlock

    from skyrl_mtp.megatron.model_builder import resolve_use_te

    _check_mtp(cfg)
    if opts.pp_size > 1:
        raise ValueError("MTP with pipeline parallel (pp_size > 1) is not implemented: use tp/dp for MTP runs")
    config = transformer_config(cfg, opts, mtp_layers=cfg.num_mtp_layers)
    return _on_device(MultiTokenPredictionBlock(config=config, spec=mtp_block_spec(cfg, resolve_use_te(opts.use_te))),
                      opts.params_dtype)


def build_native_gpt_with_mtp(cfg: Qwen35Config, opts):
    """Megatron's own GPTModel with its MTP block (reference for replay parity)."""
    from megatron.core.models.gpt import GPTModel

    from skyrl_mtp.megatron.model_builder import resolve_use_te

    _check_mtp(cfg)
    use_te = resolve_use_te(opts.use_te)
    config = transformer_config(cfg, opts, mtp_layers=cfg.num_mtp_layers)
    return _on_device(GPTModel(config=config, transformer_layer_spec=block_spec(cfg, use_te),
                               mtp_block_spec=mtp_block_spec(cfg, use_te), **_gpt_kwargs(cfg, opts)), opts.params_dtype)


# ---------------------------------------------------------------------------------------- bridge
LANGUAGE_MODEL, VISUAL = "model.language_model.", "model.visual."


def text_only_names(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The released Qwen3.5 checkpoints are multimodal (``Qwen3_5ForConditionalGeneration``): the text
    model lives under ``model.language_model.*`` and a vision tower under ``model.visual.*``, with
    ``lm_head`` and ``mtp.*`` at the top. Training and drafting here are text-only: the text names
    are mapped to the ``Qwen3_5ForCausalLM`` layout (``model.*``) and the vision tower is dropped."""
    if not any(k.startswith(LANGUAGE_MODEL) for k in hf):
        return hf
    return {("model." + k[len(LANGUAGE_MODEL):] if k.startswith(LANGUAGE_MODEL) else k): v
            for k, v in hf.items() if not k.startswith(VISUAL)}


@dataclass(frozen=True)
class Qwen35Bridge:
    """HF (Qwen3.5 text + MTP) names <-> Megatron names, full tensors (TP 1).

    Layouts converted: attention ``q_proj`` (per head ``[q | gate]``) + ``k_proj`` + ``v_proj`` <->
    ``linear_qkv`` (per query group ``[q heads | gate heads | k | v]``); GDN ``in_proj_{qkv,z,b,a}``
    <-> ``in_proj`` (their concatenation); SwiGLU gate/up <-> ``linear_fc1``; vocab padding. Every other
    tensor keeps its values, including the zero-centred norm weights (both sides store ``w`` of
    ``1 + w``).
    """

    cfg: Qwen35Config
    padded_vocab: int
    mtp_submodule: str = "transformer_layer"

    # ------------------------------------------------------------ full attention
    def _fuse_qkv(self, q_proj: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        d, heads, groups = c.head_dim, c.num_attention_heads, c.num_query_groups
        h = q_proj.shape[1]
        qg = q_proj.reshape(heads, 2, d, h)
        per = heads // groups
        q = qg[:, 0].reshape(groups, per * d, h)
        gate = qg[:, 1].reshape(groups, per * d, h)
        return torch.cat([q, gate, k.reshape(groups, d, h), v.reshape(groups, d, h)], dim=1).reshape(-1, h)

    def _split_qkv(self, qkv: torch.Tensor):
        c = self.cfg
        d, heads, groups = c.head_dim, c.num_attention_heads, c.num_query_groups
        per, h = heads // groups, qkv.shape[1]
        x = qkv.reshape(groups, (2 * per + 2) * d, h)
        q, gate, k, v = torch.split(x, [per * d, per * d, d, d], dim=1)
        q_proj = torch.stack([q.reshape(heads, d, h), gate.reshape(heads, d, h)], dim=1).reshape(2 * heads * d, h)
        return q_proj, k.reshape(groups * d, h), v.reshape(groups * d, h)

    # ------------------------------------------------------------ one layer
    def _layer_to_mc(self, hf: dict, h: str, m: str, kind: str, out: dict) -> None:
        out[f"{m}.input_layernorm.weight"] = hf[f"{h}.input_layernorm.weight"]
        out[f"{m}.pre_mlp_layernorm.weight"] = hf[f"{h}.post_attention_layernorm.weight"]
        out[f"{m}.mlp.linear_fc1.weight"] = torch.cat([hf[f"{h}.mlp.gate_proj.weight"], hf[f"{h}.mlp.up_proj.weight"]])
        out[f"{m}.mlp.linear_fc2.weight"] = hf[f"{h}.mlp.down_proj.weight"]
        s = f"{m}.self_attention"
        if kind == FULL:
            a = f"{h}.self_attn"
            out[f"{s}.linear_qkv.weight"] = self._fuse_qkv(hf[f"{a}.q_proj.weight"], hf[f"{a}.k_proj.weight"],
                                                           hf[f"{a}.v_proj.weight"])
            out[f"{s}.linear_proj.weight"] = hf[f"{a}.o_proj.weight"]
            out[f"{s}.q_layernorm.weight"] = hf[f"{a}.q_norm.weight"]
            out[f"{s}.k_layernorm.weight"] = hf[f"{a}.k_norm.weight"]
        else:
            a = f"{h}.linear_attn"
            out[f"{s}.in_proj.weight"] = torch.cat([hf[f"{a}.in_proj_{p}.weight"] for p in ("qkv", "z", "b", "a")])
            for mc_name, hf_name in (("conv1d.weight", "conv1d.weight"), ("dt_bias", "dt_bias"), ("A_log", "A_log"),
                                     ("out_norm.weight", "norm.weight"), ("out_proj.weight", "out_proj.weight")):
                out[f"{s}.{mc_name}"] = hf[f"{a}.{hf_name}"]

    def _layer_to_hf(self, mc: dict, m: str, h: str, kind: str, out: dict) -> None:
        out[f"{h}.input_layernorm.weight"] = mc[f"{m}.input_layernorm.weight"]
        out[f"{h}.post_attention_layernorm.weight"] = mc[f"{m}.pre_mlp_layernorm.weight"]
        gate, up = torch.chunk(mc[f"{m}.mlp.linear_fc1.weight"], 2, dim=0)
        out[f"{h}.mlp.gate_proj.weight"], out[f"{h}.mlp.up_proj.weight"] = gate, up
        out[f"{h}.mlp.down_proj.weight"] = mc[f"{m}.mlp.linear_fc2.weight"]
        s = f"{m}.self_attention"
        if kind == FULL:
            a = f"{h}.self_attn"
            q, k, v = self._split_qkv(mc[f"{s}.linear_qkv.weight"])
            out.update({f"{a}.q_proj.weight": q, f"{a}.k_proj.weight": k, f"{a}.v_proj.weight": v})
            out[f"{a}.o_proj.weight"] = mc[f"{s}.linear_proj.weight"]
            out[f"{a}.q_norm.weight"] = mc[f"{s}.q_layernorm.weight"]
            out[f"{a}.k_norm.weight"] = mc[f"{s}.k_layernorm.weight"]
        else:
            a, c = f"{h}.linear_attn", self.cfg
            sizes = [2 * c.linear_qk_dim + c.linear_v_dim, c.linear_v_dim, c.linear_num_value_heads,
                     c.linear_num_value_heads]
            for p, t in zip(("qkv", "z", "b", "a"), torch.split(mc[f"{s}.in_proj.weight"], sizes, dim=0)):
                out[f"{a}.in_proj_{p}.weight"] = t
            for mc_name, hf_name in (("conv1d.weight", "conv1d.weight"), ("dt_bias", "dt_bias"), ("A_log", "A_log"),
                                     ("out_norm.weight", "norm.weight"), ("out_proj.weight", "out_proj.weight")):
                out[f"{a}.{hf_name}"] = mc[f"{s}.{mc_name}"]

    # ------------------------------------------------------------ public (same contract as MimoBridge)
    def hf_to_megatron(self, hf: dict[str, torch.Tensor], *, with_mtp: bool = True,
                       source: str = "HF state dict") -> dict[str, torch.Tensor]:
        from skyrl_mtp.megatron.bridge import pad_vocab_rows
        from skyrl_mtp.models.checkpoint import validate_hf_state_dict

        hf = text_only_names(hf)
        validate_hf_state_dict(self.cfg, hf, require_mtp=with_mtp, source=source)
        out = {"embedding.word_embeddings.weight": pad_vocab_rows(hf["model.embed_tokens.weight"], self.padded_vocab)}
        for i, kind in enumerate(self.cfg.layer_types):
            self._layer_to_mc(hf, f"model.layers.{i}", f"decoder.layers.{i}", kind, out)
        out["decoder.final_layernorm.weight"] = hf["model.norm.weight"]
        if not self.cfg.tie_word_embeddings:
            out["output_layer.weight"] = pad_vocab_rows(hf["lm_head.weight"], self.padded_vocab)
        if with_mtp:
            _check_mtp(self.cfg)
            m = "mtp.layers.0"
            out[f"{m}.enorm.weight"] = hf["mtp.pre_fc_norm_embedding.weight"]
            out[f"{m}.hnorm.weight"] = hf["mtp.pre_fc_norm_hidden.weight"]
            out[f"{m}.eh_proj.weight"] = hf["mtp.fc.weight"]  # both act on cat(embed, hidden)
            out[f"{m}.final_layernorm.weight"] = hf["mtp.norm.weight"]
            self._layer_to_mc(hf, "mtp.layers.0", f"{m}.{self.mtp_submodule}", FULL, out)
        return out

    def megatron_to_hf(self, mc: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        v = self.cfg.vocab_size
        out = {"model.embed_tokens.weight": mc["embedding.word_embeddings.weight"][:v]}
        for i, kind in enumerate(self.cfg.layer_types):
            self._layer_to_hf(mc, f"decoder.layers.{i}", f"model.layers.{i}", kind, out)
        out["model.norm.weight"] = mc["decoder.final_layernorm.weight"]
        if not self.cfg.tie_word_embeddings:
            out["lm_head.weight"] = mc["output_layer.weight"][:v]
        m = "mtp.layers.0"
        if f"{m}.eh_proj.weight" in mc:
            out["mtp.pre_fc_norm_embedding.weight"] = mc[f"{m}.enorm.weight"]
            out["mtp.pre_fc_norm_hidden.weight"] = mc[f"{m}.hnorm.weight"]
            out["mtp.fc.weight"] = mc[f"{m}.eh_proj.weight"]
            out["mtp.norm.weight"] = mc[f"{m}.final_layernorm.weight"]
            self._layer_to_hf(mc, f"{m}.{self.mtp_submodule}", "mtp.layers.0", FULL, out)
        return out

    @staticmethod
    def tp_layout(name: str) -> str:
        return "replicated"  # TP 1 only (transformer_config refuses more)

    def shard_for_tp(self, full: dict[str, torch.Tensor], tp_rank: int, tp_size: int) -> dict[str, torch.Tensor]:
        if tp_size != 1:
            raise ValueError(f"model family qwen3_5 runs with tensor parallel 1, got tp_size={tp_size}")
        return dict(full)

    def gather_tp(self, shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        if len(shards) != 1:
            raise ValueError(f"model family qwen3_5 runs with tensor parallel 1, got {len(shards)} shards")
        return dict(shards[0])


def make_bridge(cfg: Qwen35Config, *, tp_size: int = 1, te_names: bool = False, divisible_by: int = 128) -> Qwen35Bridge:
    from skyrl_mtp.megatron.bridge import mtp_submodule_name
    from skyrl_mtp.megatron.model_builder import padded_vocab_size

    if tp_size != 1:
        raise ValueError(f"model family qwen3_5 runs with tensor parallel 1, got tp_size={tp_size}; set megatron.tp_size=1")
    if te_names:
        raise ValueError("model family qwen3_5: TransformerEngine names are not wired yet (use the local spec)")
    return Qwen35Bridge(cfg=cfg, padded_vocab=padded_vocab_size(cfg.vocab_size, 1, divisible_by),
                        mtp_submodule=mtp_submodule_name())
