#!/usr/bin/env bash
# Multi-turn tool use on CPU (Search-R1's loop at toy scale): the tiny model answers
# "Q code of <name> ? A" by calling <search>name</search> against a BM25 retrieval server that the
# run starts on loopback, reading the <information> it gets back and answering <answer>code</answer>.
# The code is only in the corpus. A supervised warm start (observations masked out) teaches the
# format and to copy a code from an observation; half of its trajectories answer at once without
# searching (trainer.warm_start.tool_share=0.5), so *when* to search is left to RL: GRPO/DAPO with
# MTP drafting then raises the tool-call rate and the task reward (docs/performance.md: train reward
# 0.38 -> 0.58, held-out reward at T=1 0.14 -> 0.49 over 40 steps; ~10 min warm start + ~8 min RL
# on 2 cores). Eval samples at T=1 so that it measures the policy's tool-use rate, not its argmax.
# Extra key=value arguments are passed on (e.g. trainer.total_steps=10).
set -euo pipefail
cd "$(dirname "$0")/../../.."
PY=${PYTHON:-.venv/bin/python}
exec "$PY" -m skyrl_mtp.train algorithm=dapo model=tiny data=search env.name=search generator=cpu megatron=cpu \
  trainer.mtp.enabled=true trainer.mtp.num_speculative_tokens=2 trainer.mtp.loss_type=tv \
  generator.draft_sample_method=probabilistic generator.max_response_length=128 generator.max_model_len=256 \
  env.max_turns=3 env.answer_reward=partial algorithm.overlong.buffer_len=0 \
  trainer.total_steps=40 trainer.warm_start.steps=1200 trainer.warm_start.tool_share=0.5 \
  trainer.eval_every=10 trainer.eval_greedy=false generator.eval_temperature=1.0 trainer.save_every=10 \
  trainer.train_batch_size=16 trainer.n_samples_per_prompt=4 trainer.ppo_mini_batch_size=4 trainer.optim.lr=2e-4 \
  trainer.run_dir=runs/tiny_cpu_search trainer.experiment_name=tiny_cpu_search "$@"
