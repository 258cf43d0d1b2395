"""Dataclass configs of the Megatron policy worker (the Hydra tree in skyrl_mtp.config maps onto these)."""

from __future__ import annotations

from dataclasses import dataclass, field

from skyrl_mtp.mtp.losses import LOSS_TYPES


@dataclass
class OptimConfig:
    lr: float = 1e-5
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    lr_warmup_steps: int = 0
    lr_decay_style: str = "constant"  # constant | linear | cosine
    lr_decay_steps: int = 1000


@dataclass
class MtpConfig:
    """Decoupled MTP head training (trainer.mtp.* and megatron.mtp_* map here)."""

    enabled: bool = False
    num_depths: int = 1  # = num_speculative_tokens: depths beyond the head's layers reuse the last layer
    loss_type: str = "soft_ce"
    loss_weight: float = 1.0
    topk: int | None = None
    chunk_size: int | None = None
    detach_shared_output: bool = True  # the draft loss does not train the (policy's) output layer
    detach_embedding: bool = True  # ... nor the shared embedding
    zero_first_embedding: bool = True  # match vLLM's MiMo drafter
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, clip_grad=1.0))

    def validate(self, num_mtp_layers: int) -> None:
        if not self.enabled:
            return
        if num_mtp_layers < 1:
            raise ValueError("trainer.mtp.enabled=true but the model has no MTP layers "
                             "(config.json num_nextn_predict_layers=0): use a model with MTP layers or disable MTP")
        if self.num_depths < 1:
            raise ValueError(f"trainer.mtp.num_speculative_tokens must be >= 1, got {self.num_depths}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"trainer.mtp.loss_type={self.loss_type!r} is unknown; choose one of {list(LOSS_TYPES)}")
        if self.loss_type == "topk_soft_ce" and (self.topk is None or self.topk < 1):
            raise ValueError(f"megatron.mtp_topk must be >= 1 for loss_type=topk_soft_ce, got {self.topk}")
        if self.loss_weight <= 0:
            raise ValueError(f"trainer.mtp.loss_weight must be > 0, got {self.loss_weight}")


@dataclass
class PolicyLossConfig:
    policy_loss: str = "ppo_clip"
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    clip_ratio_c: float | None = None  # dual clip (applies to negative advantages), e.g. 3.0
    loss_agg_mode: str = "token_mean"
    kl_coef: float = 0.0
    kl_type: str = "low_var_kl"
    temperature: float = 1.0  # the rollout temperature: log-probs are taken at it


@dataclass
class PolicyWorkerConfig:
    model_path: str = ""
    tp_size: int = 1
    pp_size: int = 1
    cp_size: int = 1
    micro_batch_size: int = 8
    params_dtype: str = "float32"
    seed: int = 1234
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: PolicyLossConfig = field(default_factory=PolicyLossConfig)
    mtp: MtpConfig = field(default_factory=MtpConfig)

    def validate(self, num_mtp_layers: int) -> None:
        if self.cp_size != 1:
            raise ValueError(f"context parallel (cp_size={self.cp_size}) is not supported: set cp_size=1")
        if self.pp_size != 1 and self.mtp.enabled:
            raise ValueError(f"MTP with pipeline parallel (pp_size={self.pp_size}) is not implemented: set pp_size=1")
        if self.pp_size != 1:
            raise ValueError(f"pipeline parallel (pp_size={self.pp_size}) is not implemented yet: set pp_size=1")
        if self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {self.micro_batch_size}")
        if self.params_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"params_dtype={self.params_dtype!r}: use float32 or bfloat16")
        self.mtp.validate(num_mtp_layers)
