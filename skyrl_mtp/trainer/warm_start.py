"""The supervised warm start of the tiny demo: a short SFT stage on the synthetic task, run by the
same Megatron policy worker (loss ``sft``), cached in the run directory.

RL from random weights would see reward ~0 and learn nothing in a demo's budget; after a couple
of hundred SFT steps the policy has non-trivial reward and RL has signal. The MTP head is *not*
trained here: the warm-started checkpoint keeps the initial (random) head, so the RL run shows the
head learning from scratch through the decoupled draft loss.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from skyrl_mtp.models.checkpoint import load_hf_state_dict, save_hf_checkpoint
from skyrl_mtp.models.mimo import MimoConfig
from skyrl_mtp.trainer.minibatch import build_batch
from skyrl_mtp.config.schema import AlgorithmConfig, MegatronConfig, MtpConfig, OptimConfig
from skyrl_mtp.workers.config import PolicyWorkerConfig

MARKER = "warm_start.json"


def warm_start(init_path: str | Path, out_dir: str | Path, *, steps: int, batch_size: int, lr: float, seed: int,
               tokenizer, num_cpus_per_worker: float = 1.0, num_gpus_per_worker: float = 0.0,
               params_dtype: str = "float32", threads: int = 1, log=print) -> Path:
    """SFT from `init_path` into `out_dir` (an HF checkpoint); reused when already done with the same settings."""
    from skyrl_mtp.data.synthetic import sft_pairs
    from skyrl_mtp.workers.actors import WorkerGroup

    out = Path(out_dir)
    key = {"init": str(init_path), "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed}
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
    pairs = sft_pairs(seed, steps * batch_size)
    eos = tokenizer.eos_token_id
    start = time.time()
    for step in range(steps):
        chunk = pairs[step * batch_size:(step + 1) * batch_size]
        prompts = [tokenizer.encode(p, add_special_tokens=False) for p, _ in chunk]
        responses = [tokenizer.encode(r, add_special_tokens=False) + [eos] for _, r in chunk]
        batch = build_batch(prompts, responses, pad_id=tokenizer.pad_token_id)
        batch["advantages"] = torch.ones_like(batch["loss_mask"])  # unused by the sft loss
        metrics = group.train_step(batch)
        if step % 25 == 0 or step == steps - 1:
            log(f"warm start: step {step + 1}/{steps} nll={metrics['policy/loss']:.3f} ({time.time() - start:.0f}s)")
    trunk = group.export_hf_weights()
    group.shutdown()
    # Keep the initial MTP head: the RL run trains it.
    init = load_hf_state_dict(init_path)
    merged = {**{k: v for k, v in init.items() if ".mtp_layers." in k}, **trunk}
    save_hf_checkpoint(MimoConfig.from_pretrained(init_path), merged, out, tokenizer_from=init_path)
    marker.write_text(json.dumps({"key": key, "seconds": time.time() - start}))
    return out
