"""Multi-turn episodes: the environment's observation tokens get exactly zero policy-loss and
draft-loss gradient; the model's own tokens get some. The episode comes from the real search
environment talking to the real BM25 retrieval server over loopback."""

from __future__ import annotations

import pytest
import torch

from skyrl_mtp.config.schema import AlgorithmConfig, EnvConfig, MegatronConfig, MtpConfig, OptimConfig
from skyrl_mtp.mtp.losses import shift_mask
from skyrl_mtp.trainer.minibatch import rollout_tensors
from skyrl_mtp.trainer.rollout import Rollout, RolloutBatch
from skyrl_mtp.workers import objective
from skyrl_mtp.workers.config import PolicyWorkerConfig

DEPTHS = 2


def _episodes(tokenizer):
    """Two episodes of one prompt through SearchEnv + the retrieval server: search, read the
    observation, answer (right in the first, wrong in the second)."""
    from skyrl_mtp.data.search_task import SearchTask
    from skyrl_mtp.envs import get_env
    from skyrl_mtp.envs.retrieval import RetrievalClient, start_retrieval_server

    task = SearchTask(seed=0)
    example = task.examples("train", 1)[0]
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    rollouts = []
    with start_retrieval_server(task.corpus()) as server:
        for answer in (example["answer"], "0000"):
            env = get_env("search")(EnvConfig(), RetrievalClient(server.url, timeout_s=5.0))
            env.reset(example)
            search = f"<search>{example['extra']['name']}</search>"
            found = env.step(search)
            assert not found.done and example["answer"] in found.observation and found.info["tool_calls"] == 1
            final = env.step(f"<answer>{answer}</answer>")
            assert final.done
            ids, mask = [], []
            for text, is_model in ((search, 1), (found.observation, 0), (f"<answer>{answer}</answer>", 1)):
                piece = encode(text)
                ids += piece
                mask += [is_model] * len(piece)
            rollouts.append(Rollout(group=0, prompt_ids=encode(example["prompt"]), response_ids=ids,
                                    response_mask=mask, logprobs=None, finish_reason="stop",
                                    task_reward=final.reward, reward=final.reward))
    assert [r.task_reward for r in rollouts] == [1.0, 0.0]
    return RolloutBatch(rollouts)


def test_observation_tokens_get_no_policy_or_draft_gradient(megatron_single, tiny_ckpt, monkeypatch):
    from transformers import AutoTokenizer

    from skyrl_mtp.workers.policy import MegatronPolicy

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_ckpt))
    batch = _episodes(tokenizer)
    tensors = rollout_tensors(batch, AlgorithmConfig(), pad_id=tokenizer.pad_token_id or 0)
    observation = torch.zeros_like(tensors["loss_mask"], dtype=torch.bool)  # positions predicting an observation token
    for i, r in enumerate(batch.rollouts):
        start = len(r.prompt_ids) - 1
        for j, m in enumerate(r.response_mask):
            observation[i, start + j] = m == 0
    assert observation.sum() > 40 and tensors["loss_mask"].sum() > 20

    # Every position through the head's vocabulary projection (no gathering of counted positions),
    # so the gradient of every position's draft logits is there to inspect.
    monkeypatch.setattr(objective, "GATHER_MAX_FRACTION", 0.0)
    cfg = PolicyWorkerConfig(model_path=str(tiny_ckpt), megatron=MegatronConfig(micro_batch_size=2),
                             optim=OptimConfig(lr=1e-3), algorithm=AlgorithmConfig(),
                             mtp=MtpConfig(enabled=True, num_speculative_tokens=DEPTHS))
    policy = MegatronPolicy(cfg)
    grads: dict[int, torch.Tensor] = {}  # by sequence length of the projected logits: s (policy), s - k (depth k)

    def capture(module, inputs, output):
        logits = output[0]
        logits.register_hook(lambda g: grads.__setitem__(logits.shape[0], g.detach().clone()))

    handle = policy.trunk.output_layer.register_forward_hook(capture)
    try:
        policy.accumulate_gradients(tensors)
    finally:
        handle.remove()
    seq = tensors["input_ids"].shape[1]
    assert sorted(grads) == [seq - k for k in range(DEPTHS, 0, -1)] + [seq]

    per_position = grads[seq].abs().sum(-1).transpose(0, 1)  # [b, s]: policy logits' gradient
    assert torch.all(per_position[observation] == 0)
    assert torch.all(per_position[tensors["loss_mask"] == 0] == 0)
    assert torch.all(per_position[tensors["loss_mask"] == 1] > 0)
    for k in range(1, DEPTHS + 1):
        draft = grads[seq - k].abs().sum(-1).transpose(0, 1)  # [b, s - k]: depth-k student logits' gradient
        counted = shift_mask(tensors["loss_mask"], k)[:, : seq - k]
        assert torch.all(draft[observation[:, : seq - k]] == 0), k
        assert torch.all(draft[counted == 0] == 0), k
        assert torch.all(draft[counted == 1] > 0), k
