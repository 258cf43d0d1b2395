"""The supervised warm start of the tiny demo: a short SFT stage on the synthetic task, run by the
same Megatron policy worker (loss ``sft``), cached in the run directory.

RL from random weights would see reward ~0 and learn nothing in a demo's budget; after a couple
of hundred SFT steps the policy has non-trivial reward and RL has signal. The MTP head is *not*
trained here: the warm-started checkpoint keeps the initial (random) head, so the RL run shows the
head learning from scratch through the decoupled draft loss.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch

from skyrl_mtp.models.checkpoint import load_hf_state_dict, save_hf_checkpoint
from skyrl_mtp.models.families import config_from_pretrained, is_mtp_tensor
from skyrl_mtp.trainer.minibatch import build_batch
from skyrl_mtp.config.schema import AlgorithmConfig, MegatronConfig, MtpConfig, OptimConfig
from skyrl_mtp.workers.config import PolicyWorkerConfig

MARKER = "warm_start.json"


SftSequence = tuple[list[int], list[int], list[int]]  # prompt ids, response ids, response mask (1: trained on)


def sort_sft_sequences(tokenizer, seed: int, n: int) -> list[SftSequence]:
    """The sort task's reference responses, eos-terminated as the engine ends a generation."""
    from skyrl_mtp.data.synthetic import sft_pairs

    out = []
    for prompt, response in sft_pairs(seed, n):
        ids = tokenizer.encode(response, add_special_tokens=False) + [tokenizer.eos_token_id]
        out.append((tokenizer.encode(prompt, add_special_tokens=False), ids, [1] * len(ids)))
    return out


def trajectory_sft_sequences(tokenizer, trajectories: list[tuple[str, list[tuple[str, str]]]], n: int, *,
                             seed: int) -> list[SftSequence]:
    """`n` sequences of gold multi-turn trajectories ``(prompt, [(model turn, observation), ...])``,
    drawn in a seeded order over repeated passes: model turns are trained on, observations (what
    the environment returns) are not. Turns and observations are tokenized piece by piece, exactly
    as the rollout loop concatenates token ids."""
    import random

    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    base = []
    for prompt, turns in trajectories:
        ids, mask = [], []
        for turn, observation in turns:
            turn_ids, obs_ids = encode(turn), encode(observation) if observation else []
            ids += turn_ids + obs_ids
            mask += [1] * len(turn_ids) + [0] * len(obs_ids)
        base.append((encode(prompt), ids, mask))
    rng = random.Random(seed)
    out: list[SftSequence] = []
    while len(out) < n:
        order = list(range(len(base)))
        rng.shuffle(order)
        out += [base[i] for i in order]
    return out[:n]


def warm_start(init_path: str | Path, out_dir: str | Path, *, sequences: list[SftSequence], steps: int,
               batch_size: int, lr: float, seed: int, pad_id: int, num_cpus_per_worker: float = 1.0,
               num_gpus_per_worker: float = 0.0, params_dtype: str = "float32", threads: int = 1,
               log=print) -> Path:
    """SFT from `init_path` into `out_dir` (an HF checkpoint) on `sequences` (``steps * batch_size``
    of them, in order; tokens whose mask is 0, e.g. a tool's observations, are not trained on);
    reused when already done with the same settings and data."""
    from skyrl_mtp.workers.actors import WorkerGroup

    if len(sequences) < steps * batch_size:
        raise ValueError(f"warm start needs {steps * batch_size} sequences ({steps} steps x {batch_size}), "
                         f"got {len(sequences)}")
    out = Path(out_dir)
    digest = hashlib.sha256(json.dumps(sequences[: steps * batch_size]).encode()).hexdigest()[:16]
    key = {"init": str(init_path), "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "data": digest}
    marker = out / MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("key") == key:
        log(f"warm start: reusing {out}")
        return out
    cfg = PolicyWorkerConfig(model_path=str(init_path), seed=seed,
                             megatron=MegatronConfig(micro_batch_size=batch_size, params_dtype=params_dtype),
                             optim=OptimConfig(lr=lr, lr_warmup_steps=min(20, steps // 10),
                                               lr_decay_style="cosine", lr_decay_steps=steps, min_lr=lr / 10),
                             algorithm=AlgorithmConfig(policy_loss="sft", loss_agg_mode="token_mean"),
                             mtp=MtpConfig(enabled=False))
    group = WorkerGroup(cfg, dp_size=1, num_cpus_per_worker=num_cpus_per_worker, num_gpus_per_worker=num_gpus_per_worker,
                        num_threads=threads, name="warm_start")
    start = time.time()
    for step in range(steps):
        chunk = sequences[step * batch_size:(step + 1) * batch_size]
        batch = build_batch([c[0] for c in chunk], [c[1] for c in chunk], pad_id=pad_id,
                            response_masks=[c[2] for c in chunk])
        batch["advantages"] = torch.ones_like(batch["loss_mask"])  # unused by the sft loss
        metrics = group.train_step(batch)
        if step % 25 == 0 or step == steps - 1:
            log(f"warm start: step {step + 1}/{steps} nll={metrics['policy/loss']:.3f} ({time.time() - start:.0f}s)")
    trunk = group.export_hf_weights()
    group.shutdown()
    # Keep the initial MTP head: the RL run trains it.
    init = load_hf_state_dict(init_path)
    model_cfg = config_from_pretrained(init_path)
    merged = {**{k: v for k, v in init.items() if is_mtp_tensor(model_cfg, k)}, **trunk}
    save_hf_checkpoint(model_cfg, merged, out, tokenizer_from=init_path)
    marker.write_text(json.dumps({"key": key, "seconds": time.time() - start}))
    return out
