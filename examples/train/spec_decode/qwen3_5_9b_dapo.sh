#!/usr/bin/env bash
# DAPO on Qwen3.5-9B (Gated DeltaNet hybrid) with its MTP head drafting 3 tokens, DAPO-Math-17k-style data.
#   MODEL=/ckpt/Qwen3.5-9B (or the hub id)
#   DAPO_MATH_TRAIN=/data/dapo-math-17k.parquet   (columns: prompt, reward_model.ground_truth)
# One 8-GPU node: the policy on tensor parallel 1 x data parallel 4 (the family's Gated DeltaNet layers
# are not tensor-parallel yet), 4 vLLM engines of TP 1.
# Prefix caching stays off for the hybrid (refused by config validation: docs/qwen3_5.md).
# Not run in this repository's CI (no GPU there); composes and validates in tests/config.
set -euo pipefail
cd "$(dirname "$0")/../../.."
MODEL=${MODEL:-Qwen/Qwen3.5-9B}
exec "${PYTHON:-python}" -m skyrl_mtp.train algorithm=dapo model=qwen3_5_9b data=dapo_math generator=gpu megatron=gpu \
  model.path="$MODEL" data.apply_chat_template=true \
  trainer.mtp.enabled=true trainer.mtp.num_speculative_tokens=3 trainer.mtp.loss_type=topk_soft_ce trainer.mtp.topk=64 trainer.mtp.optim.lr=1e-4 \
  trainer.total_steps=500 trainer.train_batch_size=128 trainer.n_samples_per_prompt=16 trainer.optim.lr=1e-6 trainer.ppo_mini_batch_size=32 \
  trainer.warm_start.enabled=false trainer.save_every=20 trainer.eval_every=20 \
  generator.num_engines=4 generator.tensor_parallel_size=1 generator.enable_prefix_caching=false \
  generator.max_response_length=8192 generator.max_model_len=10240 \
  megatron.tp_size=1 megatron.dp_size=4 megatron.micro_batch_size=1 megatron.mtp_loss_chunk_size=1024 \
  data.max_prompt_length=2048 algorithm.overlong.buffer_len=1024 \
  trainer.run_dir=runs/qwen3_5_9b_dapo trainer.experiment_name=qwen3_5_9b_dapo "$@"
