#!/usr/bin/env bash
# One device call: row_topk tests, its microbenchmark, then topk_soft_ce with it vs the base commit.
# bench_base/ held the package of the commit before (aa34242): git archive aa34242 skyrl_mtp | tar -x -C bench_base
set -u
R=$OUT/${RUN:-r}; mkdir -p $R
bash scripts/gpu/install_wheels.sh /tmp/site .gpu_wheels > $R/install.txt 2>&1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv > $R/gpu.txt 2>&1
timeout 170 python3 -m pytest -q -p no:cacheprovider -W ignore tests/mtp/test_topk.py tests/mtp/test_fused_loss.py > $R/pytest.txt 2>&1
timeout 150 python3 scripts/bench_topk.py --max-segs 512 1024 2048 --warps 1 2 4 > $R/bench_topk.json 2> $R/bench_topk.err
for tree in new base; do
  if [ $tree = base ]; then export PYTHONPATH=/tmp/site:$PWD/bench_base; fi
  timeout 120 python3 scripts/bench_draft_loss.py --hidden 2048 --loss-types topk_soft_ce \
    --variants fused fused_teacher_hidden > $R/loss_$tree.json 2> $R/loss_$tree.err
done
