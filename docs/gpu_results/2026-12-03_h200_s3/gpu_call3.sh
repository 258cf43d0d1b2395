#!/usr/bin/env bash
# Device call 3: every loss and variant side by side with Liger, H = 2,048 and 4,096.
set -u
R=$OUT/${RUN:-t}; mkdir -p $R
[ -d /tmp/site/megatron ] || bash scripts/gpu/install_wheels.sh /tmp/site .gpu_wheels > $R/install.txt 2>&1
python3 -m pip install -q --no-index --no-deps --target /tmp/liger .gpu_liger/*.whl >> $R/install.txt 2>&1
export PYTHONPATH=/tmp/liger:/tmp/site:$PWD
for h in 2048 4096; do
  timeout 200 python3 scripts/bench_draft_loss.py --hidden $h --fp64-check > $R/bench_all_h$h.json 2> $R/bench_all_h$h.err
done
