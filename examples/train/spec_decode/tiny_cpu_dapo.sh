#!/usr/bin/env bash
# The CPU demo (what `make train` runs): warm start + DAPO with the tiny model's MTP head
# trained by the decoupled draft loss and drafting 2 tokens in vLLM. about 5 minutes on 2 cores.
# Extra key=value arguments are passed on (e.g. trainer.total_steps=10).
set -euo pipefail
cd "$(dirname "$0")/../../.."
PY=${PYTHON:-.venv/bin/python}
exec "$PY" -m skyrl_mtp.train algorithm=dapo model=tiny data=sort generator=cpu megatron=cpu \
  trainer.mtp.enabled=true trainer.mtp.num_speculative_tokens=2 trainer.mtp.loss_type=soft_ce \
  trainer.total_steps=100 trainer.warm_start.steps=200 trainer.eval_every=20 trainer.save_every=5 \
  trainer.run_dir=runs/tiny_cpu_dapo trainer.experiment_name=tiny_cpu_dapo "$@"
