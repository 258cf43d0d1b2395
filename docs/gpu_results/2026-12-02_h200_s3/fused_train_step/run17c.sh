#!/usr/bin/env bash
set -uo pipefail
[ -d /tmp/site/megatron ] || bash scripts/gpu/install_wheels.sh /tmp/site .gpu_wheels > $OUT/install.txt 2>&1
cd .gl/clean
export PYTHONPATH=/tmp/site:$PWD PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
df -h /tmp | tail -1
timeout 420 python3 scripts/bench_train_step.py --hidden 4096 --layers 12 --heads 32 --kv-heads 8 --ffn 11008 --vocab 151680 \
  --seq 4096 --batch 4 --micro-batch 1 --steps 3 --warmup 1 > $OUT/bench_train_step_mimo7b_12layers.json 2> $OUT/bench_train_step_mimo7b_12layers.err
cat $OUT/bench_train_step_mimo7b_12layers.json; grep -v Warning $OUT/bench_train_step_mimo7b_12layers.err | tail -4
