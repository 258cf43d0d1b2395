"""What one Megatron policy rank is built from: the run's own config objects (declared once in
skyrl_mtp.config.schema), bundled with the checkpoint to load."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from skyrl_mtp.config.schema import AlgorithmConfig, MegatronConfig, MtpConfig, OptimConfig
from skyrl_mtp.mtp.losses import LOSS_TYPES


@dataclass
class PolicyWorkerConfig:
    model_path: str = ""
    megatron: MegatronConfig = field(default_factory=MegatronConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)  # the policy loss, KL, TIS
    optim: OptimConfig = field(default_factory=OptimConfig)  # the policy's optimizer
    mtp: MtpConfig = field(default_factory=MtpConfig)  # head training and its own optimizer
    temperature: float = 1.0  # the rollout temperature: log-probs are taken at it
    seed: int = 1234

    def validate(self, num_mtp_layers: int) -> None:
        """What only the checkpoint can tell, plus the layouts the worker does not implement
        (validate_config checks the rest before any worker starts)."""
        mg, mtp = self.megatron, self.mtp
        if mg.cp_size != 1:
            raise ValueError(f"context parallel (megatron.cp_size={mg.cp_size}) is not supported: set cp_size=1")
        if mg.pp_size < 1:
            raise ValueError(f"megatron.pp_size must be >= 1, got {mg.pp_size}")
        if mg.pp_size > 1 and mtp.enabled and not mtp.detach_embedding:
            raise ValueError(f"trainer.mtp.detach_embedding=false with megatron.pp_size={mg.pp_size}: the head on the "
                             "last stage uses a frozen replica of the first stage's embedding, so the draft loss "
                             "cannot train it; keep detach_embedding=true or use pp_size=1")
        if mg.micro_batch_size < 1:
            raise ValueError(f"megatron.micro_batch_size must be >= 1, got {mg.micro_batch_size}")
        budget = mg.max_tokens_per_microbatch
        if budget is not None and budget < 1:
            raise ValueError(f"megatron.max_tokens_per_microbatch must be >= 1 or null, got {budget}")
        if mg.params_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"megatron.params_dtype={mg.params_dtype!r}: use float32 or bfloat16")
        if mg.recompute not in ("none", "selective", "full"):
            raise ValueError(f"megatron.recompute={mg.recompute!r}: use none, selective or full")
        if mg.optimizer_cpu_offload and not torch.cuda.is_available():
            raise ValueError("megatron.optimizer_cpu_offload=true needs a GPU: Megatron's HybridDeviceOptimizer moves "
                             "GPU-resident optimizer shards to the host (on a CPU-only worker they are there already); "
                             "set it false")
        if mg.optimizer_cpu_offload and not mg.use_distributed_optimizer:
            raise ValueError("megatron.optimizer_cpu_offload=true offloads the distributed optimizer's shards: "
                             "set megatron.use_distributed_optimizer=true")
        if mg.use_distributed_optimizer:
            for key, optim in (("trainer.optim", self.optim), ("trainer.mtp.optim", mtp.optim)):
                if optim.optimizer != "adam" and (key == "trainer.optim" or mtp.enabled):
                    raise ValueError(f"{key}.optimizer={optim.optimizer!r}: Megatron's distributed optimizer "
                                     "wraps Adam only; use adam or megatron.use_distributed_optimizer=false")
        if not mtp.enabled:
            return
        if num_mtp_layers < 1:
            raise ValueError("trainer.mtp.enabled=true but the model has no MTP layers "
                             "(config.json num_nextn_predict_layers=0): use a model with MTP layers or disable MTP")
        if mtp.num_speculative_tokens < 1:
            raise ValueError(f"trainer.mtp.num_speculative_tokens must be >= 1, got {mtp.num_speculative_tokens}")
        if mtp.loss_type not in LOSS_TYPES:
            raise ValueError(f"trainer.mtp.loss_type={mtp.loss_type!r} is unknown; choose one of {list(LOSS_TYPES)}")
        if mtp.depth_attention == "drafter_cache" and num_mtp_layers > 1:  # vLLM drafts with the first layer only
            raise ValueError(f"trainer.mtp.depth_attention=drafter_cache models vLLM drafting with one MTP layer; the "
                             f"model has {num_mtp_layers}: set trainer.mtp.depth_attention=causal")
