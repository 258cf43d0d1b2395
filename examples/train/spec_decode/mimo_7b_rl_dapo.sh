#!/usr/bin/env bash
# DAPO on MiMo-7B-RL with its MTP head drafting 3 tokens (top-k draft loss), DAPO-Math-17k-style data.
#   MODEL=/ckpt/MiMo-7B-RL (or the hub id XiaomiMiMo/MiMo-7B-RL)
#   DAPO_MATH_TRAIN=/data/dapo-math-17k.parquet   (columns: prompt, reward_model.ground_truth)
# Sized for one 8-GPU node: TP=2 x DP=4 policy, 4 vLLM engines; join a Ray cluster with ray.address=auto.
# Not run in this repository's CI (no GPU there); see docs/gpu.md for what has been validated on GPUs.
set -euo pipefail
cd "$(dirname "$0")/../../.."
MODEL=${MODEL:-XiaomiMiMo/MiMo-7B-RL}
exec "${PYTHON:-python}" -m skyrl_mtp.train algorithm=dapo model=mimo_7b data=dapo_math generator=gpu megatron=gpu \
  model.path="$MODEL" data.apply_chat_template=true \
  trainer.mtp.enabled=true trainer.mtp.num_speculative_tokens=3 trainer.mtp.loss_type=topk_soft_ce trainer.mtp.topk=64 trainer.mtp.optim.lr=1e-4 \
  trainer.total_steps=500 trainer.train_batch_size=128 trainer.n_samples_per_prompt=16 trainer.optim.lr=1e-6 trainer.ppo_mini_batch_size=32 \
  trainer.warm_start.enabled=false trainer.save_every=20 trainer.eval_every=20 \
  generator.num_engines=4 generator.tensor_parallel_size=2 generator.max_response_length=8192 generator.max_model_len=10240 \
  megatron.tp_size=2 megatron.dp_size=4 megatron.micro_batch_size=2 megatron.mtp_loss_chunk_size=1024 \
  data.max_prompt_length=2048 algorithm.overlong.buffer_len=1024 \
  trainer.run_dir=runs/mimo_7b_rl_dapo trainer.experiment_name=mimo_7b_rl_dapo "$@"
