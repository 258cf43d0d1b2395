#!/usr/bin/env bash
# DAPO with MTP drafting (k=3) on ONE GPU (an 80-141 GB H100/H200): a MiMo-7B model, policy and vLLM
# engine colocated on the GPU and taking turns with its memory.
#   MODEL=/ckpt/MiMo-7B-RL (a local directory of sharded safetensors) or a hub id (the default).
#   MODEL=random: MiMo-7B-RL's shapes with random weights and the built-in tokenizer, on the sort
#   task without warm start (a memory and step-time rehearsal without checkpoint or data).
#   DAPO_MATH_TRAIN=/data/dapo-math-17k.parquet   (columns: prompt, reward_model.ground_truth)
# What makes a 7B policy fit beside its engine (docs/scale.md):
#   - the engine sleeps while the policy computes log-probs and trains (KV cache freed, weights
#     offloaded to host) and wakes for the GPU-to-GPU weight sync (CUDA IPC) and the next rollout;
#   - Megatron's distributed optimizer with most of its fp32 master weights, Adam state and step on
#     the host (optimizer offload);
#   - full activation recompute and sequence packing (no padding; 16k tokens per micro-batch).
# MODEL=random ran 10 DAPO steps on one H200 at 22.8 s a step (docs/performance.md); a real checkpoint has not run.
# The host needs ~110 GB of memory: 60% of the optimizer (~84 GB) and the sleeping engine's weights (~24 GB).
set -euo pipefail
cd "$(dirname "$0")/../../.."
MODEL=${MODEL:-XiaomiMiMo/MiMo-7B-RL}
if [ "$MODEL" = random ]; then
  # Random weights never solve the sort task: every sample's reward is 0, so dynamic sampling would
  # drop every group; it is off here. Responses run to the 256-token cap (no EOS is ever likely),
  # 8 prompts x 8 samples a step: a run of ten steps fits one 10-minute GPU call.
  choice=(model=mimo_7b_shapes data=sort trainer.warm_start.enabled=false algorithm.dynamic_sampling.enabled=false
          trainer.train_batch_size=8 trainer.ppo_mini_batch_size=8 generator.max_response_length=256
          generator.max_model_len=512 algorithm.overlong.buffer_len=64 trainer.eval_every=0)
else
  choice=(model=mimo_7b model.path="$MODEL" data=dapo_math data.apply_chat_template=true data.max_prompt_length=1024
          trainer.warm_start.enabled=false)
fi
# Memory on an H200 (139.8 GiB) with 125 GiB of host RAM, measured (docs/performance.md, "One-GPU 7B
# rehearsal"): the policy holds 78 GB on the GPU (bf16 weights, fp32 grads, 40% of the fp32 master
# weights + Adam moments; 115 GB at its training peak, while the engine sleeps) and 84 GB on the
# host (the other 60%, stepped there); the engine gets 25% of the GPU while it generates (35% ran
# out of memory waking its KV cache). With >= 180 GB of host RAM, optimizer_offload_fraction=1.0
# frees ~37 GB of GPU for the engine's KV cache.
exec "${PYTHON:-python}" -m skyrl_mtp.train algorithm=dapo generator=gpu megatron=gpu \
  trainer.mtp.enabled=true trainer.mtp.num_speculative_tokens=3 trainer.mtp.loss_type=tv trainer.mtp.optim.lr=1e-4 \
  generator.draft_sample_method=probabilistic \
  trainer.total_steps=200 trainer.train_batch_size=32 trainer.n_samples_per_prompt=8 trainer.ppo_mini_batch_size=16 \
  trainer.optim.lr=1e-6 trainer.save_every=20 trainer.eval_every=20 \
  generator.num_gpus_per_engine=0.5 megatron.num_gpus_per_worker=0.5 generator.gpu_memory_utilization=0.25 \
  generator.sleep_between_steps=true generator.sleep_level=1 generator.enforce_eager=false \
  generator.max_response_length=4096 generator.max_model_len=5120 algorithm.overlong.buffer_len=512 \
  megatron.use_distributed_optimizer=true megatron.optimizer_cpu_offload=true megatron.optimizer_offload_fraction=0.6 \
  megatron.recompute=full megatron.max_tokens_per_microbatch=16384 \
  trainer.run_dir=runs/mimo_7b_one_gpu_dapo trainer.experiment_name=mimo_7b_one_gpu_dapo "${choice[@]}" "$@"
