#!/usr/bin/env bash
# The CPU demo (what `make train` runs): warm start + DAPO with the tiny model's MTP head
# trained by the decoupled draft loss and drafting 2 tokens in vLLM. About 6 minutes on 2 cores.
# A short warm start (100 SFT steps) leaves the policy room to improve (held-out reward ~0.6);
# DAPO then takes 4 PPO mini-batch steps (4 prompts x 4 samples each) per rollout batch of 16
# prompts at lr 2e-4, so clip-higher acts and the eval reward rises (docs/performance.md). The
# head's depth 2 is trained as vLLM's drafter runs it (depth_attention=drafter_cache: +0.7% mean
# acceptance length on this task, docs/performance.md).
# Extra key=value arguments are passed on (e.g. trainer.total_steps=10).
set -euo pipefail
cd "$(dirname "$0")/../../.."
PY=${PYTHON:-.venv/bin/python}
exec "$PY" -m skyrl_mtp.train algorithm=dapo model=tiny data=sort generator=cpu megatron=cpu \
  trainer.mtp.enabled=true trainer.mtp.num_speculative_tokens=2 trainer.mtp.loss_type=tv \
  trainer.mtp.depth_attention=drafter_cache generator.draft_sample_method=probabilistic \
  trainer.total_steps=100 trainer.warm_start.steps=100 trainer.eval_every=20 trainer.save_every=5 \
  trainer.ppo_mini_batch_size=4 trainer.optim.lr=2e-4 \
  trainer.run_dir=runs/tiny_cpu_dapo trainer.experiment_name=tiny_cpu_dapo "$@"
