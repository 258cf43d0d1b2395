"""State-dict adapter of the mimo family: HF (MiMo) names <-> Megatron-Core names.

Megatron side: one flat dict in native GPTModel-with-MTP names (``embedding.word_embeddings.weight``,
``decoder.layers.{i}.*``, ``output_layer.weight``, ``mtp.layers.{j}.*``), full (unsharded) tensors.
:func:`shard_for_tp` cuts it for a tensor-parallel rank, :func:`gather_tp` puts rank shards back.

Layout differences handled here:
- QKV: Megatron fuses q, k, v per query group ``[g0: q.. k v | g1: q.. k v | ...]``; HF keeps
  separate q/k/v projections (weights and biases).
- SwiGLU: Megatron's ``linear_fc1`` is ``[gate; up]`` (per TP rank: ``[gate_r; up_r]``).
- MTP: Megatron's ``eh_proj`` acts on ``cat(enorm(embed), hnorm(hidden))``; MiMo's ``input_proj``
  on ``cat(hidden, embed)``: the two column halves swap.
- Layer-norm names: the local spec has ``input_layernorm`` / ``pre_mlp_layernorm``;
  TransformerEngine fuses them into ``linear_qkv.layer_norm_weight`` / ``linear_fc1.layer_norm_weight``.
- The MTP layer's decoder layer is ``transformer_layer`` in megatron-core 0.16, ``mtp_model_layer``
  from 0.17.
- Vocab rows are padded to Megatron's multiple on import and stripped on export.
- Tied embeddings: no ``output_layer.weight`` / ``lm_head.weight``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from skyrl_mtp.models.checkpoint import validate_hf_state_dict
from skyrl_mtp.models.mimo import MimoConfig


def pad_vocab_rows(w: torch.Tensor, padded_vocab: int) -> torch.Tensor:
    """`w` (vocabulary rows first) with zero rows appended up to `padded_vocab` (Megatron's padded
    vocabulary, or a TP rank's share of it)."""
    extra = padded_vocab - w.shape[0]
    if extra < 0:
        raise ValueError(f"vocab rows {w.shape[0]} exceed Megatron's padded vocab {padded_vocab}")
    return torch.cat([w, w.new_zeros(extra, *w.shape[1:])]) if extra else w


def mtp_submodule_name() -> str:
    """Name of the decoder layer inside Megatron's MTP layer, for the installed megatron-core."""
    from skyrl_mtp.megatron.compat import mcore_version
    from packaging.version import Version

    return "transformer_layer" if mcore_version() < Version("0.17.0") else "mtp_model_layer"


@dataclass(frozen=True)
class MimoBridge:
    cfg: MimoConfig
    padded_vocab: int
    te_names: bool = False
    mtp_submodule: str = "transformer_layer"

    # ---------------------------------------------------------------- names
    def _norm_names(self, prefix: str) -> tuple[str, str]:
        if self.te_names:
            return (f"{prefix}.self_attention.linear_qkv.layer_norm_weight",
                    f"{prefix}.mlp.linear_fc1.layer_norm_weight")
        return f"{prefix}.input_layernorm.weight", f"{prefix}.pre_mlp_layernorm.weight"

    def _layer_pairs(self, mc: str, hf: str):
        """(megatron prefix, hf prefix) of every decoder layer, trunk and MTP."""
        yield from ((f"{mc}.{i}", f"{hf}.{i}") for i in range(self.cfg.num_layers))

    # ---------------------------------------------------------------- qkv / fc1
    def _qkv_split(self) -> tuple[int, int, int]:
        c = self.cfg
        return c.num_attention_heads // c.num_query_groups, c.num_query_groups, c.head_dim

    def _fuse_qkv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int | None = None) -> torch.Tensor:
        """`groups` query groups (all of them by default; a TP rank's share when reading its slices)."""
        per_group, all_groups, d = self._qkv_split()
        groups = groups or all_groups
        rest = q.shape[1:]
        q = q.reshape(groups, per_group * d, *rest)
        k = k.reshape(groups, d, *rest)
        v = v.reshape(groups, d, *rest)
        return torch.cat([q, k, v], dim=1).reshape(groups * (per_group + 2) * d, *rest)

    def _split_qkv(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        per_group, groups, d = self._qkv_split()
        rest = qkv.shape[1:]
        x = qkv.reshape(groups, (per_group + 2) * d, *rest)
        q, k, v = torch.split(x, [per_group * d, d, d], dim=1)
        return (q.reshape(groups * per_group * d, *rest), k.reshape(groups * d, *rest),
                v.reshape(groups * d, *rest))

    # ---------------------------------------------------------------- decoder layer
    def _layer_to_mc(self, hf: dict, h: str, m: str, out: dict) -> None:
        ln1, ln2 = self._norm_names(m)
        out[ln1] = hf[f"{h}.input_layernorm.weight"]
        out[ln2] = hf[f"{h}.post_attention_layernorm.weight"]
        a = f"{h}.self_attn"
        out[f"{m}.self_attention.linear_qkv.weight"] = self._fuse_qkv(
            hf[f"{a}.q_proj.weight"], hf[f"{a}.k_proj.weight"], hf[f"{a}.v_proj.weight"])
        out[f"{m}.self_attention.linear_qkv.bias"] = self._fuse_qkv(
            hf[f"{a}.q_proj.bias"], hf[f"{a}.k_proj.bias"], hf[f"{a}.v_proj.bias"])
        out[f"{m}.self_attention.linear_proj.weight"] = hf[f"{a}.o_proj.weight"]
        out[f"{m}.mlp.linear_fc1.weight"] = torch.cat(
            [hf[f"{h}.mlp.gate_proj.weight"], hf[f"{h}.mlp.up_proj.weight"]], dim=0)
        out[f"{m}.mlp.linear_fc2.weight"] = hf[f"{h}.mlp.down_proj.weight"]

    def _layer_to_hf(self, mc: dict, m: str, h: str, out: dict) -> None:
        ln1, ln2 = self._norm_names(m)
        out[f"{h}.input_layernorm.weight"] = mc[ln1]
        out[f"{h}.post_attention_layernorm.weight"] = mc[ln2]
        a = f"{h}.self_attn"
        q, k, v = self._split_qkv(mc[f"{m}.self_attention.linear_qkv.weight"])
        qb, kb, vb = self._split_qkv(mc[f"{m}.self_attention.linear_qkv.bias"])
        out.update({f"{a}.q_proj.weight": q, f"{a}.k_proj.weight": k, f"{a}.v_proj.weight": v,
                    f"{a}.q_proj.bias": qb, f"{a}.k_proj.bias": kb, f"{a}.v_proj.bias": vb})
        out[f"{a}.o_proj.weight"] = mc[f"{m}.self_attention.linear_proj.weight"]
        gate, up = torch.chunk(mc[f"{m}.mlp.linear_fc1.weight"], 2, dim=0)
        out[f"{h}.mlp.gate_proj.weight"], out[f"{h}.mlp.up_proj.weight"] = gate, up
        out[f"{h}.mlp.down_proj.weight"] = mc[f"{m}.mlp.linear_fc2.weight"]

    # ---------------------------------------------------------------- public
    def hf_to_megatron(self, hf: dict[str, torch.Tensor], *, with_mtp: bool = True,
                       source: str = "HF state dict") -> dict[str, torch.Tensor]:
        """Full Megatron state dict (trunk, and the MTP layers if with_mtp) from HF tensors."""
        validate_hf_state_dict(self.cfg, hf, require_mtp=with_mtp, source=source)
        out: dict[str, torch.Tensor] = {
            "embedding.word_embeddings.weight": pad_vocab_rows(hf["model.embed_tokens.weight"], self.padded_vocab)}
        for m, h in self._layer_pairs("decoder.layers", "model.layers"):
            self._layer_to_mc(hf, h, m, out)
        out["decoder.final_layernorm.weight"] = hf["model.norm.weight"]
        if not self.cfg.tie_word_embeddings:
            out["output_layer.weight"] = pad_vocab_rows(hf["lm_head.weight"], self.padded_vocab)
        if with_mtp:
            hsz = self.cfg.hidden_size
            for j in range(self.cfg.num_mtp_layers):
                h, m = f"model.mtp_layers.{j}", f"mtp.layers.{j}"
                out[f"{m}.enorm.weight"] = hf[f"{h}.token_layernorm.weight"]
                out[f"{m}.hnorm.weight"] = hf[f"{h}.hidden_layernorm.weight"]
                proj = hf[f"{h}.input_proj.weight"]  # acts on cat(hidden, embed)
                out[f"{m}.eh_proj.weight"] = torch.cat([proj[:, hsz:], proj[:, :hsz]], dim=1)
                out[f"{m}.final_layernorm.weight"] = hf[f"{h}.final_layernorm.weight"]
                self._layer_to_mc(hf, h, f"{m}.{self.mtp_submodule}", out)
        return out

    def megatron_to_hf(self, mc: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """HF tensors from a full Megatron state dict (MTP layers exported when present)."""
        v = self.cfg.vocab_size
        out: dict[str, torch.Tensor] = {"model.embed_tokens.weight": mc["embedding.word_embeddings.weight"][:v]}
        for m, h in self._layer_pairs("decoder.layers", "model.layers"):
            self._layer_to_hf(mc, m, h, out)
        out["model.norm.weight"] = mc["decoder.final_layernorm.weight"]
        if not self.cfg.tie_word_embeddings:
            out["lm_head.weight"] = mc["output_layer.weight"][:v]
        hsz = self.cfg.hidden_size
        for j in range(self.cfg.num_mtp_layers):
            m, h = f"mtp.layers.{j}", f"model.mtp_layers.{j}"
            if f"{m}.eh_proj.weight" not in mc:
                continue
            out[f"{h}.token_layernorm.weight"] = mc[f"{m}.enorm.weight"]
            out[f"{h}.hidden_layernorm.weight"] = mc[f"{m}.hnorm.weight"]
            eh = mc[f"{m}.eh_proj.weight"]  # acts on cat(embed, hidden)
            out[f"{h}.input_proj.weight"] = torch.cat([eh[:, hsz:], eh[:, :hsz]], dim=1)
            out[f"{h}.final_layernorm.weight"] = mc[f"{m}.final_layernorm.weight"]
            self._layer_to_hf(mc, f"{m}.{self.mtp_submodule}", h, out)
        return out

    # ---------------------------------------------------------------- lazy reading
    def read_tp_shard(self, reader, tp_rank: int, tp_size: int, *, with_mtp: bool, source: str) -> dict[str, torch.Tensor]:
        """This TP rank's Megatron tensors (trunk, and the MTP layers if with_mtp) read from a
        :class:`~skyrl_mtp.models.checkpoint.CheckpointReader` as slices: the tensors of
        ``shard_for_tp(hf_to_megatron(full), tp_rank, tp_size)``, without reading the rest.
        Column-parallel weights are row ranges of the HF tensors (a rank's query groups of q, k and
        v; its share of gate and up; its vocabulary rows, zero-padded like Megatron's), row-parallel
        ones column ranges (o_proj, down_proj); norms are read whole."""
        from skyrl_mtp.models.checkpoint import validate_hf_shapes

        validate_hf_shapes(self.cfg, {k: reader.shape(k) for k in reader.keys()}, require_mtp=with_mtp, source=source)
        c = self.cfg
        per_group, groups, d = self._qkv_split()
        sizes = {"num_query_groups": groups, "ffn_hidden_size": c.ffn_hidden_size, "hidden_size": c.hidden_size}
        for what, size in sizes.items():
            if size % tp_size:
                raise ValueError(f"{source}: {what}={size} is not divisible by tp_size={tp_size}")
        g = groups // tp_size

        def rows(name: str, start: int, stop: int) -> torch.Tensor:
            return reader.get_slice(name)[start:stop]

        def cols(name: str, start: int, stop: int) -> torch.Tensor:
            return reader.get_slice(name)[:, start:stop]

        def share(total: int) -> tuple[int, int]:
            size = total // tp_size
            return tp_rank * size, (tp_rank + 1) * size

        def vocab(name: str) -> torch.Tensor:
            start, stop = share(self.padded_vocab)
            real = min(stop, c.vocab_size)
            return pad_vocab_rows(rows(name, start, real) if real > start else reader.get_slice(name)[0:0], stop - start)

        def layer(h: str, m: str, out: dict) -> None:
            ln1, ln2 = self._norm_names(m)
            out[ln1] = reader.get(f"{h}.input_layernorm.weight")
            out[ln2] = reader.get(f"{h}.post_attention_layernorm.weight")
            a = f"{h}.self_attn"
            q0, q1 = tp_rank * g * per_group * d, (tp_rank + 1) * g * per_group * d
            k0, k1 = tp_rank * g * d, (tp_rank + 1) * g * d
            for kind in ("weight", "bias"):
                out[f"{m}.self_attention.linear_qkv.{kind}"] = self._fuse_qkv(
                    rows(f"{a}.q_proj.{kind}", q0, q1), rows(f"{a}.k_proj.{kind}", k0, k1),
                    rows(f"{a}.v_proj.{kind}", k0, k1), groups=g)
            out[f"{m}.self_attention.linear_proj.weight"] = cols(f"{a}.o_proj.weight", q0, q1)
            f0, f1 = share(c.ffn_hidden_size)
            out[f"{m}.mlp.linear_fc1.weight"] = torch.cat(
                [rows(f"{h}.mlp.gate_proj.weight", f0, f1), rows(f"{h}.mlp.up_proj.weight", f0, f1)])
            out[f"{m}.mlp.linear_fc2.weight"] = cols(f"{h}.mlp.down_proj.weight", f0, f1)

        out: dict[str, torch.Tensor] = {"embedding.word_embeddings.weight": vocab("model.embed_tokens.weight")}
        for m, h in self._layer_pairs("decoder.layers", "model.layers"):
            layer(h, m, out)
        out["decoder.final_layernorm.weight"] = reader.get("model.norm.weight")
        if not c.tie_word_embeddings:
            out["output_layer.weight"] = vocab("lm_head.weight")
        if with_mtp:
            hsz = c.hidden_size
            for j in range(c.num_mtp_layers):
                h, m = f"model.mtp_layers.{j}", f"mtp.layers.{j}"
                out[f"{m}.enorm.weight"] = reader.get(f"{h}.token_layernorm.weight")
                out[f"{m}.hnorm.weight"] = reader.get(f"{h}.hidden_layernorm.weight")
                proj = rows(f"{h}.input_proj.weight", *share(hsz))  # acts on cat(hidden, embed)
                out[f"{m}.eh_proj.weight"] = torch.cat([proj[:, hsz:], proj[:, :hsz]], dim=1)
                out[f"{m}.final_layernorm.weight"] = reader.get(f"{h}.final_layernorm.weight")
                layer(h, f"{m}.{self.mtp_submodule}", out)
        return out

    # ---------------------------------------------------------------- tensor parallel
    @staticmethod
    def tp_layout(name: str) -> str:
        """How a Megatron tensor is split over TP ranks: 'replicated', 'dim0', 'dim1' or 'glu'."""
        if name.endswith("linear_fc1.weight"):
            return "glu"
        if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
            return "dim1"
        if name.endswith(("linear_qkv.weight", "linear_qkv.bias", "word_embeddings.weight",
                          "output_layer.weight", "eh_proj.weight")):
            return "dim0"
        return "replicated"

    def shard_for_tp(self, full: dict[str, torch.Tensor], tp_rank: int, tp_size: int) -> dict[str, torch.Tensor]:
        out = {}
        for name, t in full.items():
            layout = self.tp_layout(name)
            if layout == "replicated" or tp_size == 1:
                out[name] = t
            elif layout == "glu":
                gate, up = torch.chunk(t, 2, dim=0)
                out[name] = torch.cat([gate.chunk(tp_size, 0)[tp_rank], up.chunk(tp_size, 0)[tp_rank]])
            else:
                dim = 0 if layout == "dim0" else 1
                if t.shape[dim] % tp_size:
                    raise ValueError(f"{name}: dim {dim} of shape {tuple(t.shape)} not divisible by tp_size={tp_size}")
                out[name] = t.chunk(tp_size, dim)[tp_rank]
        return out

    def gather_tp(self, shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Full tensors from every TP rank's shards (rank order)."""
        out = {}
        for name, t0 in shards[0].items():
            layout = self.tp_layout(name)
            parts = [s[name] for s in shards]
            if layout == "replicated" or len(shards) == 1:
                out[name] = t0
            elif layout == "glu":
                halves = [p.chunk(2, dim=0) for p in parts]
                out[name] = torch.cat([torch.cat([g for g, _ in halves]), torch.cat([u for _, u in halves])])
            else:
                out[name] = torch.cat(parts, dim=0 if layout == "dim0" else 1)
        return out


def make_bridge(cfg: MimoConfig, *, tp_size: int = 1, te_names: bool = False, divisible_by: int = 128) -> MimoBridge:
    if getattr(cfg, "family", "mimo") == "qwen3_5":  # one bridge per family
        from skyrl_mtp.megatron import qwen3_5

        return qwen3_5.make_bridge(cfg, tp_size=tp_size, te_names=te_names, divisible_by=divisible_by)
    from skyrl_mtp.megatron.model_builder import padded_vocab_size

    return MimoBridge(cfg=cfg, padded_vocab=padded_vocab_size(cfg.vocab_size, tp_size, divisible_by),
                      te_names=te_names, mtp_submodule=mtp_submodule_name())


def read_megatron_shard(bridge, path, *, tp_rank: int, tp_size: int, with_mtp: bool) -> dict[str, torch.Tensor]:
    """A TP rank's Megatron tensors from an HF checkpoint directory, read lazily. A bridge with
    ``read_tp_shard`` (mimo) reads only the rank's slices; the others (qwen3_5 for now) read the
    tensors they convert, the MTP head's only when with_mtp, and cut the rank's shard after."""
    from skyrl_mtp.models.checkpoint import CheckpointReader
    from skyrl_mtp.models.families import is_mtp_tensor

    with CheckpointReader(path) as reader:
        if hasattr(bridge, "read_tp_shard"):
            return bridge.read_tp_shard(reader, tp_rank, tp_size, with_mtp=with_mtp, source=str(path))
        names = [n for n in reader.keys() if with_mtp or not is_mtp_tensor(bridge.cfg, n)]
        full = bridge.hf_to_megatron(reader.read(names), with_mtp=with_mtp, source=str(path))
    return bridge.shard_for_tp(full, tp_rank, tp_size)


def module_state(module: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """A module's tensors without TransformerEngine/Megatron ``_extra_state`` entries."""
    return {prefix + k: v for k, v in module.state_dict().items()
            if not k.endswith("_extra_state") and isinstance(v, torch.Tensor)}


def split_trunk_and_mtp(full: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(trunk tensors, MTP-block tensors without the ``mtp.`` prefix) of a Megatron state dict."""
    trunk = {k: v for k, v in full.items() if not k.startswith("mtp.")}
    head = {k[len("mtp."):]: v for k, v in full.items() if k.startswith("mtp.")}
    return trunk, head


def load_module_state(module: torch.nn.Module, state: dict[str, torch.Tensor], *, what: str = "model") -> None:
    """Copies `state` into `module`: every tensor covered exactly once, shapes must match."""
    own = module_state(module)
    missing = sorted(set(own) - set(state))
    if missing:
        raise ValueError(f"{what}: no tensor for {missing[0]} ({len(missing)} missing)")
    unexpected = sorted(set(state) - set(own))
    if unexpected:
        raise ValueError(f"{what}: unexpected tensor {unexpected[0]} ({len(unexpected)} unexpected)")
    for name, tensor in own.items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise ValueError(f"{what}: tensor {name} has shape {tuple(state[name].shape)}, "
                             f"the model expects {tuple(tensor.shape)}")
    with torch.no_grad():
        for name, tensor in own.items():
            tensor.copy_(state[name])
