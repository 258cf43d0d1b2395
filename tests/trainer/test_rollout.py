"""The rollout phase without engines: per-sample seeds, dynamic sampling on the task reward,
rollout tensors and their split into PPO mini-batches (whole groups)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from skyrl_mtp.config.schema import Config
from skyrl_mtp.rl.advantages import compute_advantages
from skyrl_mtp.trainer.minibatch import build_batch, mini_batch_rows, rollout_tensors, select_rows, train_tokens
from skyrl_mtp.trainer.rollout import Rollout, RolloutBatch, RolloutCollector, sample_seed


@dataclass
class _Sample:  # the fields of skyrl_mtp.inference.engine.RolloutSample the trainer reads
    token_ids: list[int]
    logprobs: list[float] | None
    finish_reason: str = "stop"


class _Tokenizer:
    eos_token_id = 0

    def encode(self, text, add_special_tokens=False):
        return [ord(c) % 50 + 1 for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i % 26) for i in ids)


class _ScriptedEngines:
    """Returns, for request i of a round, the response script[i]; records the seeds it got."""

    def __init__(self, scripts):
        self.scripts, self.seeds = list(scripts), []

    def generate(self, prompts, sampling, seeds=None):
        script = self.scripts.pop(0)
        self.seeds.append(list(seeds))
        assert len(prompts) == len(script) and sampling.n == 1
        return [[_Sample(token_ids=ids, logprobs=[-0.5] * len(ids))] for ids in script]


class _Data:
    def __init__(self, rounds):
        self.rounds = list(rounds)

    def next_batch(self):
        return self.rounds.pop(0)


def test_sample_seeds_are_distinct_per_slot_sample_step_and_round():
    seeds = {sample_seed(1234, step, rnd, slot, i) for step in range(3) for rnd in range(2)
             for slot in range(8) for i in range(4)}
    assert len(seeds) == 3 * 2 * 8 * 4
    assert sample_seed(1234, 5, 0, 2, 1) == sample_seed(1234, 5, 0, 2, 1)  # reproducible (resume)
    assert sample_seed(1234, 0, 0, 0, 0) != sample_seed(1235, 0, 0, 0, 0)
    assert all(0 <= s < 2**63 for s in seeds)


def test_dynamic_sampling_keeps_groups_by_task_reward_not_shaped_reward():
    """Group "zero": every answer wrong (task reward 0) but the lengths differ inside the overlong
    buffer, so the shaped rewards differ. DAPO keeps groups by accuracy: it must be dropped."""
    cfg = Config()
    cfg.trainer.train_batch_size, cfg.trainer.n_samples_per_prompt = 2, 2
    cfg.generator.max_response_length, cfg.algorithm.overlong.buffer_len = 10, 4
    cfg.algorithm.dynamic_sampling.enabled, cfg.algorithm.dynamic_sampling.max_rounds = True, 3
    examples = [{"prompt": "zero", "answer": "x"}, {"prompt": "mixed", "answer": "y"}]
    # responses as token lengths: group "zero" 5 and 9 tokens (penalty 0 vs -0.75), group "mixed"
    round_ = [[1] * 5, [1] * 9, [2] * 3, [3] * 3]
    engines = _ScriptedEngines([round_, round_])

    def reward_fn(text, answer):
        if answer == "x":
            return 0.0
        return 1.0 if text.startswith("c") else 0.0  # token 2 decodes to "c": right; token 3: wrong

    collector = RolloutCollector(cfg, engines, _Data([examples, examples]), _Tokenizer(), reward_fn)
    batch = collector.collect(step=7)
    kept_prompts = {tuple(r.prompt_ids) for r in batch.rollouts}
    assert kept_prompts == {tuple(_Tokenizer().encode("mixed"))}
    assert batch.num_groups == 2 and len(batch) == 4  # two rounds, one informative group each
    assert batch.metrics["dynamic_sampling/dropped_groups"] == 2.0
    shaped = sorted(r.reward for r in batch.rollouts)
    assert shaped == [0.0, 0.0, 1.0, 1.0]
    # each request got its own seed: 2 prompts x 2 samples, and round 2 differs from round 1
    assert len(set(engines.seeds[0])) == 4 and not set(engines.seeds[0]) & set(engines.seeds[1])
    assert engines.seeds[0] == [sample_seed(cfg.trainer.seed, 7, 0, slot, i) for slot in range(2) for i in range(2)]


def _batch(groups: int, per_group: int) -> RolloutBatch:
    rollouts = []
    for g in range(groups):
        for i in range(per_group):
            n = 3 + (g + i) % 4
            rollouts.append(Rollout(group=g, prompt_ids=[5, 6, 7], response_ids=list(range(1, n + 1)),
                                    response_mask=[1] * n, logprobs=[-0.1 * (k + 1) for k in range(n)],
                                    finish_reason="length" if i == 0 else "stop",
                                    task_reward=float(i), reward=float(i) + 0.1 * g))
    return RolloutBatch(rollouts)


def test_rollout_tensors_align_advantages_and_engine_logprobs():
    cfg = Config()
    cfg.algorithm.overlong.filter = True
    batch = _batch(3, 2)
    t = rollout_tensors(batch, cfg.algorithm, pad_id=0)
    adv = compute_advantages(torch.tensor([r.reward for r in batch.rollouts]), group_ids=[0, 0, 1, 1, 2, 2])
    for i, r in enumerate(batch.rollouts):
        n = len(r.response_ids)
        expected_mask = torch.zeros(t["loss_mask"].shape[1])
        if r.finish_reason != "length":  # DAPO's overlong filter drops truncated responses
            expected_mask[2:2 + n] = 1
        assert torch.equal(t["loss_mask"][i], expected_mask)
        assert torch.equal(t["input_ids"][i, :3 + n], torch.tensor([5, 6, 7] + r.response_ids))
        assert torch.allclose(t["advantages"][i], adv[i] * expected_mask)
        assert torch.allclose(t["rollout_logprobs"][i, 2:2 + n], torch.tensor(r.logprobs))


def test_observation_tokens_are_out_of_the_loss_mask():
    batch = RolloutBatch([Rollout(group=0, prompt_ids=[5, 6], response_ids=[7, 8, 9, 10, 11],
                                  response_mask=[1, 1, 0, 0, 1], logprobs=[-1.0, -2.0, 0.0, 0.0, -3.0],
                                  finish_reason="stop", task_reward=1.0, reward=1.0),
                          Rollout(group=0, prompt_ids=[5, 6], response_ids=[7], response_mask=[1], logprobs=[-1.0],
                                  finish_reason="stop", task_reward=0.0, reward=0.0)])
    t = rollout_tensors(batch, Config().algorithm, pad_id=0)
    # position t predicts token t+1: the prompt's last position predicts response token 0
    assert t["loss_mask"][0, :7].tolist() == [0, 1, 1, 0, 0, 1, 0]
    assert t["advantages"][0, 3].item() == 0.0 and t["advantages"][0, 2].item() != 0.0


def test_mini_batches_hold_whole_groups_and_cover_every_row_once_per_epoch():
    batch = _batch(6, 4)
    gen = torch.Generator().manual_seed(0)
    steps = mini_batch_rows(batch, 2, epochs=2, generator=gen)
    assert len(steps) == 6  # 3 mini-batches x 2 epochs
    for epoch in (steps[:3], steps[3:]):
        assert sorted(i for rows in epoch for i in rows) == list(range(24))
        for rows in epoch:
            assert len({batch.rollouts[i].group for i in rows}) == 2 and len(rows) == 8
    assert steps[:3] != steps[3:]  # reshuffled each epoch
    again = mini_batch_rows(batch, 2, epochs=2, generator=torch.Generator().manual_seed(0))
    assert again == steps  # seeded: a resumed run splits the same way
    assert mini_batch_rows(batch, None, epochs=1, generator=gen) == [list(range(24))]
    uneven = mini_batch_rows(batch, 4, epochs=1, generator=gen)  # 6 groups by 4: 4 + 2, no group cut
    assert sorted(len(r) for r in uneven) == [8, 16]


def test_select_rows_trims_to_the_rows_own_length():
    batch = _batch(2, 2)
    cfg = Config()
    t = rollout_tensors(batch, cfg.algorithm, pad_id=0)
    short = select_rows(t, [0])  # 3 prompt + 3 response tokens: one multiple of 8
    assert short["input_ids"].shape[1] == 8 and torch.equal(short["loss_mask"][0], t["loss_mask"][0, :8])


def test_train_tokens_count_prompt_and_response_without_padding_once_per_step():
    # prompts of 3 / 5 / 2 tokens, responses of 4 / 1 / 6: 7, 6 and 8 real tokens; padded to 8
    batch = build_batch([[1, 2, 3], [1, 2, 3, 4, 5], [1, 2]], [[6, 7, 8, 9], [6], [6, 7, 8, 9, 10, 11]], pad_id=0)
    assert batch["loss_mask"].shape == (3, 8)
    assert train_tokens(batch["loss_mask"], [[0, 1, 2]]) == 7 + 6 + 8
    # two mini-batch steps over two epochs: each row counted once per step that holds it
    assert train_tokens(batch["loss_mask"], [[0, 2], [1], [2, 1, 0]]) == (7 + 8) + 6 + (8 + 6 + 7)
