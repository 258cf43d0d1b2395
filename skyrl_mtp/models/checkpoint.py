"""HF checkpoints of the mimo family: random initialisation, saving and loading (safetensors only).

A checkpoint directory holds ``config.json`` (MiMo layout, see ``skyrl_mtp.models.mimo``), the
weights as ``model.safetensors`` or as shards ``model-0000i-of-0000n.safetensors`` listed in
``model.safetensors.index.json`` (HF's layout, which transformers and vLLM load), and, for presets
with a built-in tokenizer, the tokenizer files. Weights are read with safetensors only, never
pickle, and lazily (:class:`CheckpointReader`): a reader reads the tensors, or the slices of
tensors, it is asked for, so a rank reads its own tensor-parallel shard and the MTP-off path
reads only the head.
"""

from __future__ import annotations

import json
import math
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


PARALLEL_INIT_NUMEL = 10**9  # above this, one generator per tensor and a thread per core


def random_hf_state_dict(cfg: MimoConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random weights: normal(0, init_std) for matrices, ones for norms, zeros for biases, in `dtype`.

    Output projections (o_proj, down_proj) use std / sqrt(2 * layers), as Megatron's
    ``scaled_init_method`` does, so deeper presets start in the same regime Megatron would.
    Models above PARALLEL_INIT_NUMEL parameters draw each tensor from its own generator (seeded
    from `seed` and the tensor's index) on a thread pool: one generator is single-threaded, ~90M
    values/s, i.e. ~90 s for a 7.8B model; small presets keep the one sequential generator.
    """
    if hasattr(cfg, "random_hf_state_dict"):
        return {k: v.to(dtype) for k, v in cfg.random_hf_state_dict(seed).items()}
    scaled_std = cfg.init_std / (2.0 * max(cfg.num_layers, 1)) ** 0.5
    shapes = hf_tensor_shapes(cfg)

    def make(name: str, shape, gen: torch.Generator) -> torch.Tensor:
        if name.endswith("norm.weight"):
            return torch.ones(shape, dtype=dtype)
        if name.endswith(".bias"):
            return torch.zeros(shape, dtype=dtype)
        std = scaled_std if (".o_proj." in name or ".down_proj." in name) else cfg.init_std
        return (torch.randn(shape, generator=gen) * std).to(dtype)

    if sum(math.prod(shape) for shape in shapes.values()) <= PARALLEL_INIT_NUMEL:
        gen = torch.Generator().manual_seed(seed)
        return {name: make(name, shape, gen) for name, shape in shapes.items()}
    from concurrent.futures import ThreadPoolExecutor

    def make_own(item):  # torch's kernels release the GIL: the threads run in parallel
        index, (name, shape) = item
        return name, make(name, shape, torch.Generator().manual_seed(seed * 1_000_003 + index))

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return dict(pool.map(make_own, enumerate(shapes.items())))


def validate_hf_state_dict(cfg: MimoConfig, state: dict[str, torch.Tensor], *, require_mtp: bool, source: str) -> None:
    """Raises ValueError naming the first missing or mis-shaped tensor (before any model is built)."""
    validate_hf_shapes(cfg, {k: tuple(v.shape) for k, v in state.items()}, require_mtp=require_mtp, source=source)


def check_hf_checkpoint(cfg: MimoConfig, path: str | Path, *, require_mtp: bool) -> None:
    """validate_hf_state_dict on a checkpoint directory, from the safetensors headers only."""
    with CheckpointReader(path) as reader:
        validate_hf_shapes(cfg, {k: reader.shape(k) for k in reader.keys()}, require_mtp=require_mtp,
                           source=str(path))


def validate_hf_shapes(cfg: MimoConfig, state: dict[str, tuple[int, ...]], *, require_mtp: bool, source: str) -> None:
    """validate_hf_state_dict on name -> shape."""
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
        got = tuple(state[name])
        if got != shape:
            raise ValueError(f"{source}: tensor {name!r} has shape {got}, expected {shape} for this config")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "chat_template.jinja")


INDEX_FILE = "model.safetensors.index.json"


def save_hf_checkpoint(cfg: MimoConfig, state: dict[str, torch.Tensor], out_dir: str | Path,
                       torch_dtype: str = "float32", tokenizer_from: str | Path | None = None,
                       max_shard_bytes: int | None = None) -> Path:
    """Writes config.json + weights (+ tokenizer) atomically: a temp dir renamed into place.

    Weights: one ``model.safetensors``, or with ``max_shard_bytes`` shards of at most that size
    (a tensor larger than it gets a shard of its own) and ``model.safetensors.index.json``, as HF
    writes them; tensors are converted to `torch_dtype` one shard at a time. The tokenizer is the
    built-in one for presets that have it, else copied from `tokenizer_from`.
    """
    out = Path(out_dir)
    validate_hf_state_dict(cfg, state, require_mtp=cfg.num_mtp_layers > 0, source=str(out))
    if max_shard_bytes is not None and max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes={max_shard_bytes}: must be >= 1 (or None for one file)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    _write_weights(state, tmp, getattr(torch, torch_dtype), max_shard_bytes)
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


def _write_weights(state: dict[str, torch.Tensor], directory: Path, dtype: torch.dtype,
                   max_shard_bytes: int | None) -> None:
    from safetensors.torch import save_file

    if max_shard_bytes is None:
        tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards: list[list[str]] = [[]]
    size = 0
    for name, tensor in state.items():  # in the state's order: layers stay together
        nbytes = tensor.numel() * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    weight_map, total = {}, 0
    for i, names in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = {k: state[k].detach().to("cpu", dtype).contiguous() for k in names}
        save_file(tensors, str(directory / file), metadata={"format": "pt"})
        total += sum(t.numel() * itemsize for t in tensors.values())
        weight_map.update(dict.fromkeys(names, file))
        del tensors
    (directory / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                   indent=2))


class CheckpointReader:
    """Lazy access to the tensors of an HF safetensors checkpoint directory.

    Which file holds which tensor comes from ``model.safetensors.index.json`` when present, else
    from the headers of the ``*.safetensors`` files (no tensor data is read for that). Tensors are
    read on request, whole (:meth:`get`) or as slices (:meth:`get_slice`, safetensors' lazy
    slicing: only the requested rows or columns are read). Use as a context manager, or close()."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        self.path = Path(path)
        self._open = lambda f: safe_open(str(self.path / f), framework="pt")
        self._handles: dict[str, object] = {}
        index = self.path / INDEX_FILE
        if index.is_file():
            self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            missing = sorted({f for f in self.weight_map.values() if not (self.path / f).is_file()})
            if missing:
                raise FileNotFoundError(f"{index} lists {missing[0]}, which is not in {self.path}")
            return
        files = sorted(p.name for p in self.path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no .safetensors files in {path}: only safetensors checkpoints are loaded")
        self.weight_map = {}
        for f in files:
            for name in self._handle_of(f).keys():
                if name in self.weight_map:
                    raise ValueError(f"{path}: tensor {name!r} is in both {self.weight_map[name]} and {f}")
                self.weight_map[name] = f

    def _handle_of(self, file: str):
        if file not in self._handles:
            self._handles[file] = self._open(file).__enter__()
        return self._handles[file]

    def _file(self, name: str) -> str:
        if name not in self.weight_map:
            raise KeyError(f"{self.path}: no tensor {name!r} in the checkpoint")
        return self.weight_map[name]

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle_of(self._file(name)).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        return self._handle_of(self._file(name)).get_tensor(name)

    def get_slice(self, name: str):
        """safetensors' lazy slice: index it (``[a:b]``, ``[:, a:b]``) to read just that part."""
        return self._handle_of(self._file(name)).get_slice(name)

    def read(self, names=None) -> dict[str, torch.Tensor]:
        return {n: self.get(n) for n in (self.keys() if names is None else names)}

    def close(self) -> None:
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles.clear()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_hf_state_dict(path: str | Path, names=None) -> dict[str, torch.Tensor]:
    """The tensors of an HF checkpoint directory (all, or just `names`), read with safetensors."""
    with CheckpointReader(path) as reader:
        return reader.read(names)


def load_mtp_head(path: str | Path, cfg=None) -> dict[str, torch.Tensor]:
    """Only the MTP head's tensors of a checkpoint (the frozen head of an MTP-off run): the rest of
    the checkpoint is not read."""
    from skyrl_mtp.models.families import is_mtp_tensor

    with CheckpointReader(path) as reader:
        return reader.read([n for n in reader.keys() if is_mtp_tensor(cfg, n)])


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
