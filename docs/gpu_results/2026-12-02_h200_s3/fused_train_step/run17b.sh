#!/usr/bin/env bash
set -uo pipefail
[ -d /tmp/site/megatron ] || bash scripts/gpu/install_wheels.sh /tmp/site .gpu_wheels > $OUT/install.txt 2>&1
cd .gl/clean
export PYTHONPATH=/tmp/site:$PWD
mkdir -p /tmp/ck
VARIANT=off CKPT=/tmp/ck/m timeout 150 python3 ../prof_step.py > $OUT/prof_off.txt 2>&1; grep -A40 "^VARIANT" $OUT/prof_off.txt | cut -c1-150 | head -25
VARIANT=on CKPT=/tmp/ck/m timeout 150 python3 ../prof_step.py > $OUT/prof_on.txt 2>&1; grep -A40 "^VARIANT" $OUT/prof_on.txt | cut -c1-150 | head -40
