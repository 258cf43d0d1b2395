"""The rollout phase of one RL step: generate -> score -> dynamic sampling -> a typed
:class:`RolloutBatch`.

Single turn (``env.name`` null): one generation per sample, scored by the reward function.
Multi-turn (an environment, e.g. ``search``): a model turn ends at one of the environment's stop
strings (a tool call, kept in the output) or EOS; the environment's observation is tokenized and
appended, and the sample generates again from the whole context, up to ``env.max_turns`` model
turns and ``generator.max_response_length`` response tokens (model and observation tokens).
Every round of turns is one batched call over all unfinished samples and all engines; samples
that finished (answered, out of turns or tokens) drop out, so samples at different turns share
those calls. The engines' prefix caches hold the context between turns. Observation tokens are
marked in ``response_mask`` (0): they get no policy loss and no draft loss.

Every sampled response has its own random stream: its seed is derived from the run seed and
(step, generation round, slot in the round's prompt batch, sample index, turn), so two copies of
one prompt in a batch draw different samples, step s+1 never replays step s's streams, and a
resumed run draws exactly what the uninterrupted run would have drawn.
"""

from __future__ import annotations

from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from skyrl_mtp.config.schema import Config
from skyrl_mtp.rl.dynamic_sampling import DynamicSampler
from skyrl_mtp.rl.shaping import overlong_penalty


def sample_seed(run_seed: int, step: int, round_index: int, slot: int, sample: int, turn: int = 0) -> int:
    """The seed of one response's (one turn's) sampling stream, a 63-bit int as vLLM takes it.
    numpy's SeedSequence hashes the tuple, so nearby tuples give unrelated streams."""
    words = np.random.SeedSequence([run_seed, step, round_index, slot, sample, turn]).generate_state(
        2, dtype=np.uint32)
    return int((int(words[0]) << 32 | int(words[1])) & (2**63 - 1))


@dataclass
class Rollout:
    """One sampled response (one episode in a multi-turn environment) and what it earned."""

    group: int  # its prompt group in the batch (groups are contiguous)
    prompt_ids: list[int]
    response_ids: list[int]  # the model's tokens and, between turns, the environment's observations
    response_mask: list[int]  # 1: a model token (trained on); 0: an observation token (never trained on)
    logprobs: list[float] | None  # the engine's log-prob of each response token (0.0 on observations)
    finish_reason: str  # "stop" | "length" (out of tokens or turns) | "abort"
    task_reward: float  # the reward function's / environment's score (dynamic sampling and eval use it)
    reward: float  # task reward + shaping (DAPO's overlong punishment): what advantages use
    turns: int = 1
    info: dict[str, float] = field(default_factory=dict)  # environment counters over the episode

    @property
    def num_model_tokens(self) -> int:
        return sum(self.response_mask)


@dataclass
class RolloutBatch:
    rollouts: list[Rollout]
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def num_groups(self) -> int:
        return len({r.group for r in self.rollouts})

    def __len__(self) -> int:
        return len(self.rollouts)


@dataclass
class _Episode:
    """A multi-turn sample in progress."""

    slot: int
    sample: int
    prompt_ids: list[int]
    env: Any  # skyrl_mtp.envs.base.TextEnv
    response_ids: list[int] = field(default_factory=list)
    response_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    turns: int = 0
    done: bool = False
    reward: float = 0.0
    finish_reason: str = "length"
    info: dict[str, float] = field(default_factory=lambda: defaultdict(float))


class RolloutCollector:
    """Turns prompts into a RolloutBatch with the engines, the reward function (single turn) or
    an environment (multi-turn), and DAPO's dynamic sampling (groups whose *task* rewards all
    agree carry no signal and are dropped).

    `make_env` (multi-turn only) returns a fresh environment for one episode."""

    def __init__(self, cfg: Config, engines, dataset, tokenizer, reward_fn: Callable[..., float] | None,
                 make_env: Callable[[], Any] | None = None):
        self.cfg, self.engines, self.dataset = cfg, engines, dataset
        self.tokenizer, self.reward_fn, self.make_env = tokenizer, reward_fn, make_env

    def encode_prompt(self, prompt) -> list[int]:
        if isinstance(prompt, list):  # chat messages
            ids = self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
        elif self.cfg.data.apply_chat_template:
            ids = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                     add_generation_prompt=True, tokenize=True)
        else:
            ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        ids = list(ids)
        if len(ids) > self.cfg.data.max_prompt_length:
            ids = ids[-self.cfg.data.max_prompt_length:]  # keep the end: that is where the question is
        return ids

    def sampling(self, eval_mode: bool = False, stop: tuple[str, ...] = ()):
        from skyrl_mtp.inference.config import SamplingConfig

        g, t = self.cfg.generator, self.cfg.trainer
        common = dict(max_tokens=g.max_response_length, n=1, stop_token_ids=(self.tokenizer.eos_token_id,),
                      stop=stop, include_stop_str_in_output=bool(stop))
        if eval_mode:
            temperature = 0.0 if t.eval_greedy else g.eval_temperature
            return SamplingConfig(temperature=temperature, top_p=1.0, seed=t.seed, **common)
        # n=1: each sample is its own request with its own seed (see sample_seed)
        return SamplingConfig(temperature=g.temperature, top_p=g.top_p, **common)

    # ------------------------------------------------------------------ scoring
    def shape(self, rollouts: list[Rollout]) -> None:
        """Adds DAPO's soft overlong punishment to each rollout's reward."""
        overlong, g = self.cfg.algorithm.overlong, self.cfg.generator
        if overlong.buffer_len > 0:
            penalty = overlong_penalty([len(r.response_ids) for r in rollouts], g.max_response_length,
                                       overlong.buffer_len, overlong.penalty_factor)
            for r, p in zip(rollouts, penalty.tolist()):
                r.reward = r.task_reward + p

    def score(self, examples, prompts: list[list[int]], samples) -> list[Rollout]:
        """Single turn: rewards for ``samples[prompt][sample]``; ``group`` is the prompt's index."""
        rollouts = []
        for group, (example, prompt_ids, per_prompt) in enumerate(zip(examples, prompts, samples)):
            for s in per_prompt:
                text = self.tokenizer.decode(s.token_ids, skip_special_tokens=True)
                task = float(self.reward_fn(text, example["answer"], **example.get("extra", {})))
                rollouts.append(Rollout(group=group, prompt_ids=prompt_ids, response_ids=list(s.token_ids),
                                        response_mask=[1] * len(s.token_ids), logprobs=s.logprobs,
                                        finish_reason=s.finish_reason, task_reward=task, reward=task))
        self.shape(rollouts)
        return rollouts

    # ------------------------------------------------------------------ generation
    def generate(self, examples, *, step: int, round_index: int, samples_per_prompt: int,
                 eval_mode: bool = False) -> list[Rollout]:
        prompts = [self.encode_prompt(e["prompt"]) for e in examples]
        if self.make_env is not None:
            return self.run_episodes(examples, prompts, step=step, round_index=round_index,
                                     samples_per_prompt=samples_per_prompt, eval_mode=eval_mode)
        n = samples_per_prompt
        requests = [p for p in prompts for _ in range(n)]
        seeds = None if eval_mode else [sample_seed(self.cfg.trainer.seed, step, round_index, slot, i)
                                        for slot in range(len(prompts)) for i in range(n)]
        flat = self.engines.generate(requests, self.sampling(eval_mode), seeds=seeds)
        samples = [[flat[slot * n + i][0] for i in range(n)] for slot in range(len(prompts))]
        return self.score(examples, prompts, samples)

    def run_episodes(self, examples, prompts: list[list[int]], *, step: int, round_index: int,
                     samples_per_prompt: int, eval_mode: bool) -> list[Rollout]:
        """Multi-turn: all episodes advance one model turn per batched call (see the module doc)."""
        cfg, budget = self.cfg, self.cfg.generator.max_response_length
        episodes = []
        for slot, (example, prompt_ids) in enumerate(zip(examples, prompts)):
            for i in range(samples_per_prompt):
                env = self.make_env()
                env.reset(example)
                episodes.append(_Episode(slot=slot, sample=i, prompt_ids=prompt_ids, env=env))
        stop = tuple(episodes[0].env.stop) if episodes else ()
        sampling = self.sampling(eval_mode, stop=stop)
        window = "eval_turn" if eval_mode else "turn"
        try:
            for turn in range(cfg.env.max_turns):
                active = [e for e in episodes if not e.done]
                if not active:
                    break
                label = f"{window}_{turn + 1}"
                if self.engines.metrics.is_running(label) is False and label in self.engines.metrics.open_labels:
                    self.engines.metrics.resume(label)
                else:
                    self.engines.metrics.start(label)
                out = self.engines.generate(
                    [e.prompt_ids + e.response_ids for e in active], sampling,
                    seeds=None if eval_mode else [sample_seed(cfg.trainer.seed, step, round_index, e.slot, e.sample,
                                                              turn) for e in active],
                    max_tokens=[budget - len(e.response_ids) for e in active])
                self.engines.metrics.pause(label)
                texts = [self.tokenizer.decode(s.token_ids, skip_special_tokens=True) for (s,) in out]
                # tool calls block (HTTP, up to env.timeout_s): run the episodes' steps side by side
                with ThreadPoolExecutor(max_workers=min(32, len(active))) as pool:
                    results = list(pool.map(lambda pair: pair[0].env.step(pair[1]), zip(active, texts)))
                for e, (s,), result in zip(active, out, results):
                    self._advance(e, s, result, last_turn=turn == cfg.env.max_turns - 1)
        finally:
            for e in episodes:
                e.env.close()
        rollouts = [Rollout(group=e.slot, prompt_ids=e.prompt_ids, response_ids=e.response_ids,
                            response_mask=e.response_mask, logprobs=e.logprobs, finish_reason=e.finish_reason,
                            task_reward=e.reward, reward=e.reward, turns=e.turns, info=dict(e.info))
                    for e in episodes]
        self.shape(rollouts)
        return rollouts

    def _advance(self, e: _Episode, s, result, *, last_turn: bool) -> None:
        """One model turn of an episode: keep the model's tokens, then append the environment's
        observation (masked out) or finish the episode."""
        budget = self.cfg.generator.max_response_length
        e.turns += 1
        e.response_ids += s.token_ids
        e.response_mask += [1] * len(s.token_ids)
        e.logprobs += s.logprobs if s.logprobs is not None else [0.0] * len(s.token_ids)
        for key, value in result.info.items():
            e.info[key] += value
        if result.done:
            e.done, e.reward, e.finish_reason = True, float(result.reward), "stop"
            return
        observation = self.tokenizer.encode(result.observation, add_special_tokens=False)
        room = budget - len(e.response_ids)
        if s.finish_reason == "length" or last_turn or room <= len(observation):
            # out of tokens or turns before an answer: the episode ends unanswered (reward 0)
            e.done, e.finish_reason = True, "length"
            return
        e.response_ids += observation
        e.response_mask += [0] * len(observation)
        e.logprobs += [0.0] * len(observation)

    def collect(self, step: int) -> RolloutBatch:
        """Generate until the batch holds train_batch_size informative groups (DAPO dynamic
        sampling) or the rounds run out; without dynamic sampling, one round."""
        ds = self.cfg.algorithm.dynamic_sampling
        sampler = DynamicSampler(self.cfg.trainer.train_batch_size, ds.max_rounds if ds.enabled else 1)
        task_rewards: list[float] = []
        all_rollouts: list[Rollout] = []
        while True:
            round_index = sampler.rounds
            rollouts = self.generate(self.dataset.next_batch(), step=step, round_index=round_index,
                                     samples_per_prompt=self.cfg.trainer.n_samples_per_prompt)
            task_rewards += [r.task_reward for r in rollouts]
            all_rollouts += rollouts
            if not ds.enabled:
                return RolloutBatch(rollouts, {"reward/mean": float(np.mean(task_rewards)),
                                               **self.turn_metrics(all_rollouts, "turn")})
            if sampler.add([r.task_reward for r in rollouts], [(round_index, r.group) for r in rollouts],
                           samples=rollouts):
                break
        result = sampler.result()
        metrics = {**result.metrics, "reward/mean": float(np.mean(task_rewards)),
                   **self.turn_metrics(all_rollouts, "turn")}
        for r, g in zip(result.samples, result.group_index.tolist()):
            r.group = int(g)
        return RolloutBatch(list(result.samples), metrics)

    def evaluate(self, examples) -> tuple[list[Rollout], dict[str, float]]:
        rollouts = self.generate(examples, step=0, round_index=0, samples_per_prompt=1, eval_mode=True)
        return rollouts, self.turn_metrics(rollouts, "eval_turn")

    def turn_metrics(self, rollouts: list[Rollout], window: str) -> dict[str, float]:
        """Multi-turn only: per-turn acceptance (the engines' metric windows of each turn), turns,
        model and observation tokens, tool calls and errors per episode."""
        if self.make_env is None or not rollouts:
            return {}
        out = {}
        for label in [w for w in self.engines.metrics.open_labels if w.startswith(f"{window}_")]:
            out.update(self.engines.metrics.stop(label))
        prefix = "env/" if window == "turn" else "eval/env/"
        n = len(rollouts)
        out[f"{prefix}turns_mean"] = sum(r.turns for r in rollouts) / n
        out[f"{prefix}model_tokens_mean"] = sum(r.num_model_tokens for r in rollouts) / n
        out[f"{prefix}observation_tokens_mean"] = sum(len(r.response_ids) - r.num_model_tokens for r in rollouts) / n
        for key in sorted({k for r in rollouts for k in r.info}):
            out[f"{prefix}{key}_per_episode"] = sum(r.info.get(key, 0.0) for r in rollouts) / n
        out[f"{prefix}answered_frac"] = sum(r.finish_reason == "stop" for r in rollouts) / n
        return out
