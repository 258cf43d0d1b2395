"""The rollout phase of one RL step: generate -> score -> dynamic sampling -> a typed
:class:`RolloutBatch`.

Every sampled response has its own random stream: its seed is derived from the run seed and
(step, generation round, slot in the round's prompt batch, sample index), so two copies of one
prompt in a batch draw different samples, step s+1 never replays step s's streams, and a resumed
run draws exactly what the uninterrupted run would have drawn.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from skyrl_mtp.config.schema import Config
from skyrl_mtp.rl.dynamic_sampling import DynamicSampler
from skyrl_mtp.rl.shaping import overlong_penalty


def sample_seed(run_seed: int, step: int, round_index: int, slot: int, sample: int) -> int:
    """The seed of one response's sampling stream (a 63-bit int, as vLLM takes it). numpy's
    SeedSequence hashes the tuple, so nearby tuples give unrelated streams."""
    words = np.random.SeedSequence([run_seed, step, round_index, slot, sample]).generate_state(2, dtype=np.uint32)
    return int((int(words[0]) << 32 | int(words[1])) & (2**63 - 1))


@dataclass
class Rollout:
    """One sampled response and what it earned."""

    group: int  # its prompt group in the batch (groups are contiguous)
    prompt_ids: list[int]
    sample: Any  # skyrl_mtp.inference.engine.RolloutSample: token_ids, logprobs, finish_reason, ...
    task_reward: float  # the reward function's score (what dynamic sampling and eval look at)
    reward: float  # task reward + shaping (DAPO's overlong punishment): what advantages use


@dataclass
class RolloutBatch:
    rollouts: list[Rollout]
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def num_groups(self) -> int:
        return len({r.group for r in self.rollouts})

    def __len__(self) -> int:
        return len(self.rollouts)


class RolloutCollector:
    """Turns prompts into a RolloutBatch with the engines, the reward function and DAPO's
    dynamic sampling (groups whose *task* rewards all agree carry no signal and are dropped)."""

    def __init__(self, cfg: Config, engines, dataset, tokenizer, reward_fn: Callable[..., float]):
        self.cfg, self.engines, self.dataset = cfg, engines, dataset
        self.tokenizer, self.reward_fn = tokenizer, reward_fn

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

    def sampling(self, eval_mode: bool = False):
        from skyrl_mtp.inference.config import SamplingConfig

        g, t = self.cfg.generator, self.cfg.trainer
        stop = (self.tokenizer.eos_token_id,)
        if eval_mode:
            temperature = 0.0 if t.eval_greedy else g.eval_temperature
            return SamplingConfig(temperature=temperature, top_p=1.0, max_tokens=g.max_response_length, n=1,
                                  stop_token_ids=stop, seed=t.seed)
        # n=1: each sample is its own request with its own seed (see sample_seed)
        return SamplingConfig(temperature=g.temperature, top_p=g.top_p, max_tokens=g.max_response_length, n=1,
                              stop_token_ids=stop)

    def score(self, examples, prompts: list[list[int]], samples) -> list[Rollout]:
        """Rewards for ``samples[prompt][sample]``; ``group`` is the prompt's index here."""
        rollouts = []
        for group, (example, prompt_ids, per_prompt) in enumerate(zip(examples, prompts, samples)):
            for s in per_prompt:
                text = self.tokenizer.decode(s.token_ids, skip_special_tokens=True)
                task = float(self.reward_fn(text, example["answer"], **example.get("extra", {})))
                rollouts.append(Rollout(group=group, prompt_ids=prompt_ids, sample=s, task_reward=task, reward=task))
        overlong, g = self.cfg.algorithm.overlong, self.cfg.generator
        if overlong.buffer_len > 0:
            penalty = overlong_penalty([len(r.sample.token_ids) for r in rollouts], g.max_response_length,
                                       overlong.buffer_len, overlong.penalty_factor)
            for r, p in zip(rollouts, penalty.tolist()):
                r.reward = r.task_reward + p
        return rollouts

    def generate_round(self, step: int, round_index: int) -> list[Rollout]:
        examples = self.dataset.next_batch()
        prompts = [self.encode_prompt(e["prompt"]) for e in examples]
        n = self.cfg.trainer.n_samples_per_prompt
        requests = [p for p in prompts for _ in range(n)]
        seeds = [sample_seed(self.cfg.trainer.seed, step, round_index, slot, i)
                 for slot in range(len(prompts)) for i in range(n)]
        flat = self.engines.generate(requests, self.sampling(), seeds=seeds)
        samples = [[flat[slot * n + i][0] for i in range(n)] for slot in range(len(prompts))]
        return self.score(examples, prompts, samples)

    def collect(self, step: int) -> RolloutBatch:
        """Generate until the batch holds train_batch_size informative groups (DAPO dynamic
        sampling) or the rounds run out; without dynamic sampling, one round."""
        ds = self.cfg.algorithm.dynamic_sampling
        sampler = DynamicSampler(self.cfg.trainer.train_batch_size, ds.max_rounds if ds.enabled else 1)
        task_rewards: list[float] = []
        while True:
            round_index = sampler.rounds
            rollouts = self.generate_round(step, round_index)
            task_rewards += [r.task_reward for r in rollouts]
            if not ds.enabled:
                return RolloutBatch(rollouts, {"reward/mean": float(np.mean(task_rewards))})
            if sampler.add([r.task_reward for r in rollouts], [(round_index, r.group) for r in rollouts],
                           samples=rollouts):
                break
        result = sampler.result()
        metrics = {**result.metrics, "reward/mean": float(np.mean(task_rewards))}
        kept = [Rollout(group=int(g), prompt_ids=r.prompt_ids, sample=r.sample, task_reward=r.task_reward,
                        reward=r.reward) for r, g in zip(result.samples, result.group_index.tolist())]
        return RolloutBatch(kept, metrics)

    def evaluate(self, examples) -> list[Rollout]:
        prompts = [self.encode_prompt(e["prompt"]) for e in examples]
        samples = self.engines.generate(prompts, self.sampling(eval_mode=True))
        return self.score(examples, prompts, samples)
