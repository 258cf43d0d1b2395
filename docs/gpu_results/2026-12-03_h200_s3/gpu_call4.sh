#!/usr/bin/env bash
# Device call 4: the kernels with ROWS rows per program (1 on a GPU): tests, microbenchmark, loss.
set -u
R=$OUT/${RUN:-u}; mkdir -p $R
[ -d /tmp/site/megatron ] || bash scripts/gpu/install_wheels.sh /tmp/site .gpu_wheels > $R/install.txt 2>&1
export PYTHONPATH=/tmp/site:$PWD
timeout 170 python3 -m pytest -q -p no:cacheprovider -W ignore tests/mtp/test_topk.py tests/mtp/test_fused_loss.py 2>&1 | tail -3 > $R/pytest_tail.txt
timeout 100 python3 scripts/bench_topk.py --warps 1 2 4 > $R/bench_topk.json 2> $R/bench_topk.err
timeout 100 python3 scripts/bench_draft_loss.py --hidden 2048 --loss-types topk_soft_ce \
  --variants fused fused_teacher_hidden > $R/loss_topk.json 2> $R/loss_topk.err
