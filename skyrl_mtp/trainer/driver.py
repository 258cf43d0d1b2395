"""The RL loop: one readable function per phase, run by :class:`RLTrainer`.

Per step: rollout (vLLM drafting with the policy's MTP head -> rewards -> dynamic sampling;
trainer/rollout.py) -> advantages -> old and reference log-probs (Megatron) -> one policy + draft
head optimizer step per PPO mini-batch -> weight sync (policy and draft head into every engine)
-> metrics -> checkpoint.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from skyrl_mtp.config.schema import Config, resolve_weight_sync_rollback, resolve_weight_transport, validate_config
from skyrl_mtp.trainer.checkpoint import CheckpointManager, check_compatible


WARM_START_TASKS = ("sort", "search")  # built-in tasks with reference responses for the supervised warm start


def _log(msg: str) -> None:
    print(f"[skyrl_mtp] {msg}", flush=True)


def _without_draft_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Drafting off: spec-decode counters are all zero and meaningless; leave them out."""
    return {k: v for k, v in metrics.items() if "draft" not in k and "accepted" not in k}


EXPORT_SHARD_BYTES = 5 * 1024**3  # the final HF export: HF's default shard size


class RLTrainer:
    def __init__(self, cfg: Config):
        self.cfg = validate_config(cfg)  # every config error surfaces here, before Ray starts
        self.run_dir = Path(cfg.trainer.run_dir)
        self.ckpt = CheckpointManager(self.run_dir, cfg.trainer.keep_last_n)
        self.policy = self.ref = self.engines = self.retrieval_server = None
        self._frozen_head = None
        self._policy_has_frozen_head = False  # send_frozen_head_to_policy
        self.draft_control = None  # generator.draft_control=auto: picks each step's k
        self.step = 0

    # ------------------------------------------------------------------ set-up
    def resolve_model(self) -> Path:
        """The HF checkpoint RL starts from: model.path (local or hub id), or a random checkpoint
        of the preset, warm-started on the synthetic task."""
        m, t = self.cfg.model, self.cfg.trainer
        if m.path:
            path = Path(m.path)
            if path.is_dir():
                return path
            from huggingface_hub import snapshot_download

            _log(f"downloading {m.path} from the hub")
            try:
                return Path(snapshot_download(m.path, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))
            except Exception as err:
                raise RuntimeError(f"model.path={m.path!r}: download from the hub failed ({err}); download the "
                                   "checkpoint where the hub is reachable and pass its directory") from err
        from skyrl_mtp.models.checkpoint import random_hf_state_dict, save_hf_checkpoint
        from skyrl_mtp.models.families import get_preset

        init = self.run_dir / "init_model"
        if not (init / "config.json").is_file():
            preset = get_preset(m.preset)
            # bf16 where policy and engines both run bf16 (half the bytes to write and read: 15.6 GB
            # at 7.8B), in HF-sized shards; fp32 otherwise (the CPU demo trains in fp32)
            bf16 = self.cfg.megatron.params_dtype == "bfloat16" and self.cfg.generator.dtype == "bfloat16"
            dtype = "bfloat16" if bf16 else "float32"
            save_hf_checkpoint(preset, random_hf_state_dict(preset, m.init_seed, getattr(torch, dtype)), init,
                               torch_dtype=dtype, max_shard_bytes=EXPORT_SHARD_BYTES)
        if not (t.warm_start.enabled and self.cfg.data.name in WARM_START_TASKS):
            return init
        from transformers import AutoTokenizer

        from skyrl_mtp.trainer.warm_start import warm_start

        tokenizer = AutoTokenizer.from_pretrained(str(init))
        mg = self.cfg.megatron
        return warm_start(init, self.run_dir / "warm_start", steps=t.warm_start.steps,
                          batch_size=t.warm_start.batch_size, lr=t.warm_start.lr, seed=m.init_seed,
                          sequences=self.warm_start_sequences(tokenizer, t.warm_start.steps * t.warm_start.batch_size),
                          pad_id=tokenizer.pad_token_id or 0, num_cpus_per_worker=mg.num_cpus_per_worker,
                          num_gpus_per_worker=mg.num_gpus_per_worker, params_dtype=mg.params_dtype,
                          threads=mg.threads_per_worker, log=_log)

    def warm_start_sequences(self, tokenizer, n: int):
        """Reference (prompt, response, mask) sequences of the built-in tasks for the warm start."""
        from skyrl_mtp.trainer.warm_start import sort_sft_sequences, trajectory_sft_sequences

        if self.cfg.data.name == "search":
            task = self.search_task()
            share = self.cfg.trainer.warm_start.tool_share
            # Enough passes that every drawn sequence has its own tool / guess draw (one pass suffices at 1.0).
            passes = 1 if share == 1.0 else -(-n // len(task.examples("train")))
            trajectories = task.sft_trajectories(task.index(), topk=self.cfg.env.topk, tool_share=share,
                                                 passes=passes, seed=self.cfg.model.init_seed)
            return trajectory_sft_sequences(tokenizer, trajectories, n, seed=self.cfg.model.init_seed)
        return sort_sft_sequences(tokenizer, self.cfg.model.init_seed, n)

    def search_task(self):
        from skyrl_mtp.data.search_task import SearchTask

        return SearchTask(seed=self.cfg.data.seed)

    def start_environments(self):
        """The factory of one episode's environment (None: single-turn), and for the search
        environment its retrieval server (started on loopback unless env.retrieval_url is given)."""
        e = self.cfg.env
        if e.name is None:
            return None
        from skyrl_mtp.envs.base import get_env

        resources = None
        if e.name == "search":
            from skyrl_mtp.envs.retrieval import RetrievalClient, start_retrieval_server

            url = e.retrieval_url
            if url is None:
                corpus = e.corpus_path or self.search_task().corpus()
                self.retrieval_server = start_retrieval_server(corpus, max_concurrency=e.max_concurrency)
                url = self.retrieval_server.url
                _log(f"retrieval server (BM25) on {url}")
            resources = RetrievalClient(url, timeout_s=e.timeout_s)
        factory = get_env(e.name)
        return lambda: factory(e, resources)

    def speculative_tokens(self) -> int | None:
        g, k = self.cfg.generator, self.cfg.trainer.mtp
        if g.speculative_config is not None:  # explicit vLLM settings win over trainer.mtp
            return int(g.speculative_config.get("num_speculative_tokens", 1))
        return k.num_speculative_tokens if k.enabled else None

    def policy_worker_config(self, model_path: Path):
        from skyrl_mtp.workers.config import PolicyWorkerConfig

        c = self.cfg
        return PolicyWorkerConfig(model_path=str(model_path), megatron=c.megatron, algorithm=c.algorithm,
                                  optim=c.trainer.optim, mtp=c.trainer.mtp, temperature=c.generator.temperature,
                                  seed=c.trainer.seed)

    def rollout_config(self, model_path: Path):
        from skyrl_mtp.inference.config import RolloutConfig

        g = self.cfg.generator
        return RolloutConfig(model_path=str(model_path), num_engines=g.num_engines,
                             tensor_parallel_size=g.tensor_parallel_size,
                             num_speculative_tokens=self.speculative_tokens(),
                             speculative_method=(g.speculative_config or {}).get("method", "mtp"),
                             draft_sample_method=g.draft_sample_method,
                             runtime_draft_tokens=g.draft_control == "auto",
                             max_model_len=g.max_model_len, dtype=g.dtype, seed=self.cfg.trainer.seed,
                             # the requests of one generation round each engine runs at once
                             max_num_seqs=-(-self.cfg.trainer.train_batch_size * self.cfg.trainer.n_samples_per_prompt
                                            // g.num_engines),
                             gpu_memory_utilization=g.gpu_memory_utilization, enforce_eager=g.enforce_eager,
                             enable_prefix_caching=g.enable_prefix_caching,
                             bucket_bytes=g.weight_sync_bucket_mb << 20, num_cpus_per_engine=g.num_cpus_per_engine,
                             num_gpus_per_engine=g.num_gpus_per_engine,
                             weight_transport=resolve_weight_transport(self.cfg),
                             keep_weights_for_rollback=resolve_weight_sync_rollback(self.cfg),
                             sleep_level=g.sleep_level if g.sleep_between_steps else 0)

    def build_datasets(self):
        from skyrl_mtp.data.datasets import PromptDataset, load_examples, synthetic_examples

        d, t = self.cfg.data, self.cfg.trainer
        if d.name == "sort":
            train = synthetic_examples(d.seed, d.num_train, "train")
            evals = synthetic_examples(d.seed + 1, d.num_eval, "eval")
        elif d.name == "search":
            task = self.search_task()
            train = task.examples("train")
            evals = task.examples("eval", min(d.num_eval, len(task.examples("eval"))))
        else:
            train = load_examples(d.train_path, prompt_key=d.prompt_key, answer_key=d.answer_key)
            evals = (load_examples(d.eval_path, prompt_key=d.prompt_key, answer_key=d.answer_key)[: d.num_eval]
                     if d.eval_path else [])
        return PromptDataset(train, t.train_batch_size, seed=d.seed), evals

    def local_ray_cpus(self) -> int | None:
        """Logical CPUs of a local Ray: at least what the configured actors ask for, so a small
        machine never leaves an actor unschedulable (Ray's CPUs are a scheduling count only)."""
        import math
        import os

        c = self.cfg
        if c.ray.address is not None or c.ray.num_cpus is not None:
            return c.ray.num_cpus
        mg, g = c.megatron, c.generator
        workers = mg.dp_size * mg.tp_size * mg.pp_size * (2 if c.algorithm.use_kl_loss else 1)
        needed = workers * mg.num_cpus_per_worker + g.num_engines * g.num_cpus_per_engine
        return max(os.cpu_count() or 1, math.ceil(needed))

    def setup(self) -> None:
        from transformers import AutoTokenizer

        from skyrl_mtp.inference.group import RolloutEngineGroup
        from skyrl_mtp.rewards.registry import get_reward
        from skyrl_mtp.trainer.rollout import RolloutCollector
        from skyrl_mtp.workers.actors import WorkerGroup, ray_init_local

        c = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.json").write_text(json.dumps(asdict(c), indent=2, default=str))
        actor_logs = self.run_dir / "logs" if c.trainer.actor_output == "file" else None
        ray_init_local(num_cpus=self.local_ray_cpus(), address=c.ray.address, dashboard=c.ray.dashboard,
                       actor_log_dir=str(actor_logs.resolve()) if actor_logs else None)
        if actor_logs:
            _log(f"vLLM / Megatron / Ray actor output: {actor_logs}/")
        self.model_path = self.resolve_model()
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_path))
        self.reward_fn = get_reward(c.data.reward)
        self.train_data, self.eval_examples = self.build_datasets()
        mg = c.megatron
        worker_cfg = self.policy_worker_config(self.model_path)
        _log(f"starting {mg.dp_size * mg.tp_size * mg.pp_size} policy worker(s) and {c.generator.num_engines} rollout engine(s)")
        started = time.time()  # start-up is minutes at 7B: say where it goes
        self.policy = WorkerGroup(worker_cfg, dp_size=mg.dp_size, num_cpus_per_worker=mg.num_cpus_per_worker,
                                  num_gpus_per_worker=mg.num_gpus_per_worker, num_threads=mg.threads_per_worker)
        if c.algorithm.use_kl_loss:
            self.ref = WorkerGroup(worker_cfg, dp_size=mg.dp_size, trainable=False, name="ref",
                                   num_cpus_per_worker=mg.num_cpus_per_worker,
                                   num_gpus_per_worker=mg.num_gpus_per_worker, num_threads=mg.threads_per_worker)
        _log(f"policy worker(s) up in {time.time() - started:.0f} s")
        started = time.time()
        self.engines = RolloutEngineGroup(self.rollout_config(self.model_path))
        _log(f"rollout engine(s) up in {time.time() - started:.0f} s")
        if c.generator.draft_control == "auto":
            from skyrl_mtp.inference.draft_control import DraftController

            self.draft_control = DraftController(max_k=self.speculative_tokens(),
                                                 probe_every=c.generator.draft_probe_every)
        self.rollouts = RolloutCollector(c, self.engines, self.train_data, self.tokenizer, self.reward_fn,
                                         make_env=self.start_environments())
        _log(f"weight sync: {self.engines.transport.name} transport, buckets of {c.generator.weight_sync_bucket_mb} MB")

    def maybe_resume(self) -> None:
        t = self.cfg.trainer
        if t.resume == "none":
            return
        directory = Path(t.resume) if t.resume != "auto" else self.ckpt.latest()
        if directory is None:
            return
        state = CheckpointManager.read_state(directory)
        check_compatible(state.get("compat", {}), self.compat(), directory)
        self.policy.load_checkpoint(str(directory))
        self.train_data.load_state_dict(state["data"])
        random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python_rng"]))
        self.step = state["step"]
        if self.draft_control is not None and "draft_control" in state:
            self.draft_control.load_state_dict(state["draft_control"])
        self.sync_engine_weights(version=self.step + 1)
        _log(f"resumed from {directory} at step {self.step}")

    def compat(self) -> dict[str, Any]:
        c = self.cfg
        return {"model": c.model.path or c.model.preset, "mtp": c.trainer.mtp.enabled,
                "tp_size": c.megatron.tp_size, "pp_size": c.megatron.pp_size, "dp_size": c.megatron.dp_size}

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict[str, float]:
        """Rollout -> advantages -> old / reference log-probs -> one optimizer step per PPO
        mini-batch -> weight sync."""
        from skyrl_mtp.trainer.minibatch import rollout_tensors, train_tokens

        timings = {}
        t0 = time.time()
        if self.draft_control is not None:
            k = self.draft_control.next_k()
            self.engines.set_num_draft_tokens(k)
        self.engines.metrics.start("train")
        batch = self.rollouts.collect(self.step)
        window = self.engines.metrics.stop("train")
        metrics = dict(batch.metrics)
        metrics.update(window if self.speculative_tokens() else _without_draft_metrics(window))
        if self.draft_control is not None:
            # rates vLLM left out (no drafts verified this step) stay out: the controller skips the step
            rates = [window[key] for key in (f"vllm/draft_acceptance_rate_pos_{i}" for i in range(k)) if key in window]
            self.draft_control.observe(k, window.get("vllm/generation_tokens_per_s", 0.0), rates)
            metrics.update({"draft/k": float(k), **self.draft_control.metrics()})
        timings["timing/generate_s"] = time.time() - t0
        metrics.update(self.memory("generate"))
        sleeping = self.cfg.generator.sleep_between_steps
        if sleeping:  # the policy's phases get the engines' memory
            timings["timing/sleep_s"] = self.engines.sleep()
            metrics.update(self.memory("asleep", policy=False))
        if not batch.rollouts:
            _log(f"step {self.step + 1}: no informative groups after dynamic sampling; skipping the update")
            if sleeping:
                timings["timing/wake_s"] = self.engines.wake_up()
            return {**metrics, **timings}
        lengths = [len(r.response_ids) for r in batch.rollouts]
        metrics.update({"response/length_mean": sum(lengths) / len(lengths),
                        "response/truncated_frac": sum(r.finish_reason == "length" for r in batch.rollouts)
                        / len(batch),
                        "reward/shaped_mean": sum(r.reward for r in batch.rollouts) / len(batch)})
        tensors = rollout_tensors(batch, self.cfg.algorithm, pad_id=self.tokenizer.pad_token_id or 0)
        steps = self.mini_batches(batch)
        t1 = time.time()
        if len(steps) > 1:  # later mini-batches need the log-probs of the rollout's weights
            tensors["old_logprobs"] = self.policy.compute_logprobs(tensors)["logprobs"]
        if self.ref is not None:
            tensors["ref_logprobs"] = self.ref.compute_logprobs(tensors)["logprobs"]
        timings["timing/logprobs_s"] = time.time() - t1
        t2 = time.time()
        metrics.update(self.update_policy(tensors, steps))
        timings["timing/train_s"] = time.time() - t2
        metrics["train/tokens_per_s"] = train_tokens(tensors["loss_mask"], steps) / timings["timing/train_s"]
        metrics.update(self.memory("train"))
        t3 = time.time()
        if sleeping:  # weights first: the sync writes into them; the KV cache after
            timings["timing/wake_s"] = self.engines.wake_up(["weights"])
        stats = self.sync_engine_weights(version=self.step + 2, timings=timings)
        if sleeping:
            timings["timing/wake_s"] += self.engines.wake_up(["kv_cache"])
        applied = [e["apply_s"] for e in stats.per_engine.values() if isinstance(e, dict) and "apply_s" in e]
        if applied:  # the in-place reload of target + drafter inside the slowest engine
            timings["timing/weight_apply_s"] = max(applied)
        timings["timing/weight_sync_s"] = time.time() - t3
        timings["timing/weight_deliver_s"] = stats.deliver_s  # begin + every bucket on every engine
        metrics.update({"weight_sync/bytes": float(stats.nbytes), "weight_sync/buckets": float(stats.num_buckets)})
        metrics.update(self.memory("sync"))
        return {**metrics, **timings}

    def memory(self, phase: str, *, policy: bool = True) -> dict[str, float]:
        """``memory/<phase>/*`` at the end of a phase: the policy ranks' (host RSS; on CUDA torch's
        allocated / reserved, the phase's peak, the device's used memory) and the engines'."""
        from skyrl_mtp.logging.memory import memory_metrics

        out = memory_metrics(phase, "engine", self.engines.memory_stats())
        if policy:
            out.update(memory_metrics(phase, "policy", self.policy.memory_stats(reset_peak=True)))
        return out

    def mini_batches(self, batch) -> list[list[int]]:
        """Rows of each optimizer step: trainer.ppo_epochs passes over the batch, shuffled into
        trainer.ppo_mini_batch_size groups each (seeded by the run seed and step: resumable)."""
        from skyrl_mtp.trainer.minibatch import mini_batch_rows

        t = self.cfg.trainer
        generator = torch.Generator().manual_seed(t.seed * 1_000_003 + self.step)
        return mini_batch_rows(batch, t.ppo_mini_batch_size, epochs=t.ppo_epochs, generator=generator)

    def update_policy(self, tensors: dict[str, torch.Tensor], steps: list[list[int]]) -> dict[str, float]:
        """One optimizer step (policy and MTP head) per mini-batch; metrics averaged over the steps."""
        from skyrl_mtp.trainer.minibatch import select_rows

        per_step = []
        for rows in steps:
            mini = select_rows(tensors, rows)
            if not mini["loss_mask"].any():  # e.g. every response overlong-filtered: nothing to learn
                continue
            per_step.append(self.policy.train_step(mini))
        if not per_step:
            return {"policy/optimizer_steps": 0.0}
        keys = set().union(*per_step)
        out = {k: sum(m[k] for m in per_step if k in m) / sum(k in m for m in per_step) for k in keys}
        for k in keys:
            if k.endswith("_max"):
                out[k] = max(m[k] for m in per_step if k in m)
            elif k.startswith("timing/"):  # time adds up over the steps
                out[k] = sum(m[k] for m in per_step if k in m)
        out["policy/lr"] = per_step[-1]["policy/lr"]
        out["policy/optimizer_steps"] = float(len(per_step))
        return out

    def sync_engine_weights(self, version: int, timings: dict[str, float] | None = None):
        """Policy (+ draft head) -> every engine, as weight ``version``. Ray transport: exported to
        host memory here, then sent; cuda_ipc: the policy rank packs buckets on its GPU and the
        engines copy them GPU to GPU; broadcast: the policy rank broadcasts the buckets to every
        engine worker (for both, export time is part of the sync)."""
        if self.engines.transport.name in ("cuda_ipc", "broadcast"):  # the policy rank sends: no host copy here
            self.send_frozen_head_to_policy()
            return self.engines.sync_weights(self.policy, version=version)
        t = time.time()
        weights = self.policy_weights()
        if timings is not None:
            timings["timing/weight_export_s"] = time.time() - t  # Megatron -> HF names, on the host
        return self.engines.sync_weights(weights, version=version)

    def checkpoint_head(self) -> dict[str, torch.Tensor]:
        """The checkpoint's MTP head (frozen with MTP off), read alone: the trunk's tensors are not read."""
        from skyrl_mtp.models.checkpoint import load_mtp_head
        from skyrl_mtp.models.families import config_from_pretrained

        return load_mtp_head(self.model_path, config_from_pretrained(self.model_path))

    def frozen_head(self) -> dict[str, torch.Tensor]:
        """The checkpoint's MTP head, read once: with MTP off it is not trained, and it completes the
        weights the engines and the export need."""
        if self._frozen_head is None:
            self._frozen_head = self.checkpoint_head()
        return self._frozen_head

    def send_frozen_head_to_policy(self) -> None:
        """With MTP off, the policy rank that sends the weights (GPU weight sync, the final export)
        adds the frozen head to them: sent to it once."""
        if not self.cfg.trainer.mtp.enabled and not self._policy_has_frozen_head:
            self.policy.set_export_extras(self.frozen_head())
            self._policy_has_frozen_head = True

    def policy_weights(self) -> dict[str, torch.Tensor]:
        """The policy's HF-named tensors on the host, for the Ray weight transport (the frozen head
        completes them with MTP off)."""
        weights = self.policy.export_hf_weights()
        if not self.cfg.trainer.mtp.enabled:
            weights = {**self.frozen_head(), **weights}
        return weights

    def evaluate(self) -> dict[str, float]:
        if not self.eval_examples:
            return {}
        self.engines.metrics.start("eval")
        rollouts, turn_metrics = self.rollouts.evaluate(self.eval_examples)
        metrics = {**self.engines.metrics.stop("eval"), **turn_metrics}
        if not self.speculative_tokens():
            metrics = _without_draft_metrics(metrics)
        rewards = [r.task_reward for r in rollouts]  # eval reports the task reward, without shaping
        metrics["eval/reward_mean"] = sum(rewards) / len(rewards)
        metrics["eval/exact_match"] = sum(r >= 1.0 for r in rewards) / len(rewards)
        return metrics

    def save(self) -> None:
        state = {"data": self.train_data.state_dict(), "python_rng": random.getstate(), "compat": self.compat()}
        if self.draft_control is not None:
            state["draft_control"] = self.draft_control.state_dict()
        path = self.ckpt.save(self.step, lambda d: self.policy.save_checkpoint(str(d)), state)
        _log(f"checkpoint {path}")

    def export_final(self) -> Path:
        """bf16 shards + index, as HF publishes checkpoints (half the bytes of fp32; vLLM and
        transformers load the index), written by the policy rank that holds the weights."""
        self.send_frozen_head_to_policy()
        return self.policy.save_hf_export(self.run_dir / "hf_export", max_shard_bytes=EXPORT_SHARD_BYTES)

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict[str, float]:
        from skyrl_mtp.logging.report import plot_run, summarize_run
        from skyrl_mtp.logging.trackers import ConsoleLogger, JsonlLogger, Tracker, WandbLogger

        t = self.cfg.trainer
        self.setup()
        self.maybe_resume()
        sinks = []
        if "console" in t.loggers:
            sinks.append(ConsoleLogger(t.total_steps))
        if "jsonl" in t.loggers:
            sinks.append(JsonlLogger(self.run_dir / "metrics.jsonl", resume_step=self.step))
        if "wandb" in t.loggers and t.wandb_mode != "disabled":
            sinks.append(WandbLogger(self.run_dir, t.project_name, t.experiment_name, asdict(self.cfg), t.wandb_mode))
        tracker = Tracker(sinks)
        last: dict[str, float] = {}
        if t.eval_every and self.step == 0:  # the starting point, so the plot shows what RL changed
            tracker.log(self.evaluate(), 0)
        try:
            while self.step < t.total_steps:
                start = time.time()
                metrics = self.train_step()
                self.step += 1
                if (t.eval_every and self.step % t.eval_every == 0) or self.step == t.total_steps:
                    metrics.update(self.evaluate())
                metrics["timing/step_s"] = time.time() - start
                tracker.log(metrics, self.step)
                last = metrics
                if t.save_every and (self.step % t.save_every == 0 or self.step == t.total_steps):
                    self.save()
        finally:
            tracker.close()
        # The engines are done. A colocated engine asleep holds its weights on the host (23.5 GB at
        # 7B), which the export needs: the one-H200 7B rehearsal ran the host out of memory here.
        self.engines.shutdown()
        self.engines = None
        export = self.export_final()
        jsonl = self.run_dir / "metrics.jsonl"
        if jsonl.is_file():
            try:
                plot_run(jsonl, self.run_dir / "metrics.png")
            except ImportError as e:  # matplotlib is optional (e.g. a bare GPU image): the JSONL has it all
                _log(f"no plot ({e}); install matplotlib for {self.run_dir / 'metrics.png'}")
            print(summarize_run(jsonl, self.run_dir / "summary.md", title=f"{t.experiment_name}"))
        _log(f"done: {self.step} steps; HF export at {export}; plots and summary in {self.run_dir}")
        return last

    def shutdown(self) -> None:
        import ray

        if self.retrieval_server is not None:
            self.retrieval_server.close()
        for group in (self.engines, self.policy, self.ref):
            if group is not None:
                try:
                    group.shutdown()
                except Exception as err:  # best effort: Ray is going down next anyway
                    _log(f"shutdown: {err}")
        if ray.is_initialized():
            ray.shutdown()
