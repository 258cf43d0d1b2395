#!/usr/bin/env bash
# The CPU demo on the qwen3_5 hybrid (issue 18): same task and schedule as tiny_cpu_dapo.sh, with
# model=qwen3_5_tiny (Gated DeltaNet x3 + gated full attention + 1 MTP layer). vLLM runs it in
# bfloat16 (its CPU Gated DeltaNet kernel needs it) without prefix caching (refused for the
# hybrid: docs/qwen3_5.md). Extra key=value arguments are passed on (e.g. trainer.total_steps=10).
set -euo pipefail
cd "$(dirname "$0")/../../.."
PY=${PYTHON:-.venv/bin/python}
exec "$PY" -m skyrl_mtp.train algorithm=dapo model=qwen3_5_tiny data=sort generator=cpu megatron=cpu \
  generator.dtype=bfloat16 generator.enable_prefix_caching=false \
  trainer.mtp.enabled=true trainer.mtp.num_speculative_tokens=2 trainer.mtp.loss_type=tv \
  generator.draft_sample_method=probabilistic \
  trainer.total_steps=100 trainer.warm_start.steps=100 trainer.eval_every=20 trainer.save_every=5 \
  trainer.ppo_mini_batch_size=4 trainer.optim.lr=2e-4 \
  trainer.run_dir=runs/qwen3_5_tiny_cpu_dapo trainer.experiment_name=qwen3_5_tiny_cpu_dapo "$@"
