#!/usr/bin/env bash
# One GPU, colocated: DAPO on the ~0.5B `small` preset (sort task), policy and one vLLM engine on
# the same GPU by a memory split (Ray gives each half a GPU; vLLM may use 35% of its memory, the
# policy takes what it needs of the rest). Weight sync goes GPU to GPU (CUDA IPC, chosen by
# generator.weight_transport=auto for this placement). The MTP head is trained by the decoupled draft loss and
# drafts 3 tokens. MTP=0 runs the same job without MTP (no head training, no drafting).
#   MTP=1 bash examples/train/spec_decode/small_gpu_dapo.sh [key=value ...]
# Set-up and measured numbers: docs/gpu.md, docs/performance.md.
set -euo pipefail
cd "$(dirname "$0")/../../.."
MTP=${MTP:-1}
if [ "$MTP" = 1 ]; then mtp="trainer.mtp.enabled=true"; name=small_gpu_dapo_mtp; else mtp="trainer.mtp.enabled=false"; name=small_gpu_dapo_nomtp; fi
exec "${PYTHON:-python}" -m skyrl_mtp.train algorithm=dapo model=small data=sort generator=gpu megatron=gpu \
  $mtp trainer.mtp.num_speculative_tokens=3 trainer.mtp.loss_type=soft_ce \
  generator.num_gpus_per_engine=0.5 megatron.num_gpus_per_worker=0.5 generator.gpu_memory_utilization=0.35 \
  generator.max_response_length=40 generator.max_model_len=256 generator.enforce_eager=false \
  megatron.micro_batch_size=16 trainer.mtp.optim.lr=3e-4 megatron.mtp_loss_chunk_size=null \
  trainer.total_steps=20 trainer.optim.lr=1e-5 trainer.warm_start.steps=200 trainer.warm_start.lr=5e-4 \
  trainer.eval_every=10 trainer.save_every=20 trainer.loggers=[console,jsonl] \
  trainer.run_dir=runs/$name trainer.experiment_name=$name "$@"
