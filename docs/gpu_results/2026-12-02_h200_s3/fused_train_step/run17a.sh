#!/usr/bin/env bash
# Issue 17 on the H200: fused path in use, invariance (all losses + negative control), train-step overhead at ~1B.
set -uo pipefail
root=$PWD
bash scripts/gpu/install_wheels.sh /tmp/site .gpu_wheels > $OUT/install.txt 2>&1; tail -1 $OUT/install.txt
cd .gl/clean
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/gpu.txt 2>&1
python3 - > $OUT/fused_in_use.txt 2>&1 <<'PY'
import torch, megatron.core, triton
from skyrl_mtp.mtp.fused_loss import fused_available
print("torch", torch.__version__, "triton", triton.__version__, "megatron-core", megatron.core.__version__)
print("fused_available(cuda):", fused_available(torch.device("cuda")), "(trainer.mtp.fused_loss=true -> DraftObjective.fused=None: fused on CUDA when available)")
PY
cat $OUT/fused_in_use.txt | head -3
for t in soft_ce topk_soft_ce hard_ce tv; do
  timeout 120 python3 -m skyrl_mtp.tools.check_policy_invariance --steps 5 --loss-type "$t" >> $OUT/invariance.jsonl 2>> $OUT/invariance.err
  tail -1 $OUT/invariance.jsonl | cut -c1-200
done
timeout 120 python3 -m skyrl_mtp.tools.check_policy_invariance --steps 5 --attach-output-layer > $OUT/invariance_negative_control.json 2>> $OUT/invariance.err
cut -c1-200 $OUT/invariance_negative_control.json
timeout 200 python3 scripts/bench_train_step.py > $OUT/bench_train_step_1b.json 2> $OUT/bench_train_step_1b.err; cat $OUT/bench_train_step_1b.json; tail -3 $OUT/bench_train_step_1b.err
