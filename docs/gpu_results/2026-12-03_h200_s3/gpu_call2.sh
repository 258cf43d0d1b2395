#!/usr/bin/env bash
# Device call 2: chunk rows for topk_soft_ce with row_topk, invariance, all losses side by side.
set -u
R=$OUT/${RUN:-s}; mkdir -p $R
[ -d /tmp/site/megatron ] || bash scripts/gpu/install_wheels.sh /tmp/site .gpu_wheels .gpu_liger > $R/install.txt 2>&1
export PYTHONPATH=/tmp/site:$PWD
timeout 100 python3 scripts/bench_draft_loss.py --hidden 2048 --loss-types topk_soft_ce --fused-chunk-rows 2048 4096 \
  --variants fused fused_teacher_hidden > $R/topk_rows.json 2> $R/topk_rows.err
timeout 80 python3 -m skyrl_mtp.tools.check_policy_invariance --steps 5 --loss-type topk_soft_ce > $R/invariance_topk.txt 2>&1
timeout 240 python3 scripts/bench_draft_loss.py --hidden 2048 --fp64-check > $R/bench_all_h2048.json 2> $R/bench_all_h2048.err
