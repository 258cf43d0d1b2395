#!/usr/bin/env bash
# Call A (carry .gpu_wheels): megatron-core set; optimizer offload with host-side master weights
# (fractions 1.0 and 0.5) against no offload; the packing tests with the per-sequence attention;
# packed vs padded train tokens/s at MiMo-7B layer shapes (12 layers, plain Adam fits).
set -uo pipefail
bash scripts/gpu/install_wheels.sh /tmp/site .gpu_wheels > $OUT/install.txt 2>&1; tail -1 $OUT/install.txt
export PYTHONPATH=/tmp/site:$PWD
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; free -g; nproc; df -h /tmp; } > $OUT/machine.txt 2>&1
timeout 150 python3 -m pytest -q -p no:cacheprovider -W ignore tests/workers/test_scale_features.py -k offload > $OUT/pytest_offload.txt 2>&1; tail -2 $OUT/pytest_offload.txt
# timeout 120 python3 -m pytest -q -p no:cacheprovider -W ignore tests/workers/test_packing.py tests/megatron/test_packed_attention.py > $OUT/pytest_packing.txt 2>&1; tail -2 $OUT/pytest_packing.txt
PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout 240 python3 scripts/bench_packing.py --preset mimo_7b_shapes \
  --layers 12 --batch 64 --seq 4096 --prompt-len 256 --median-len 400 --budget 16384 --micro-batch 2 --dtype bfloat16 --recompute full \
  --warmup 1 --steps 3 > $OUT/bench_packing_mimo7b_12l.json 2> $OUT/bench_packing.err
cut -c1-600 $OUT/bench_packing_mimo7b_12l.json; tail -3 $OUT/bench_packing.err
