#!/usr/bin/env bash
# Issue 18 on the H200, Megatron side: the qwen3_5 hybrid with fla's Gated DeltaNet kernels.
set -uo pipefail
bash scripts/gpu/install_wheels.sh /tmp/site .gpu_wheels .gl/whl18 > $OUT/install.txt 2>&1; tail -1 $OUT/install.txt
cd .gl/clean
export PYTHONPATH=/tmp/site:$PWD
python3 -c "
import torch, fla, megatron.core
from skyrl_mtp.megatron.qwen3_5 import gdn_module
from megatron.core.ssm.gated_delta_net import HAVE_FLA
print('fla', fla.__version__, 'megatron-core', megatron.core.__version__, 'HAVE_FLA', HAVE_FLA, 'gdn_module', gdn_module().__module__, gdn_module().__name__)
" > $OUT/versions.txt 2>&1; tail -2 $OUT/versions.txt
for dt in float32 bfloat16; do
  timeout 150 python3 -m skyrl_mtp.tools.check_policy_invariance --steps 3 --preset qwen3_5_tiny --dtype $dt > $OUT/invariance_qwen3_5_$dt.json 2> $OUT/invariance_qwen3_5_$dt.err
  cut -c1-250 $OUT/invariance_qwen3_5_$dt.json; grep -E "Error|error" $OUT/invariance_qwen3_5_$dt.err | tail -3
done
timeout 150 python3 -m pytest -q -p no:cacheprovider -W ignore tests/megatron/test_qwen3_5.py tests/workers/test_qwen3_5_policy.py > $OUT/pytest_qwen3_5.txt 2>&1; tail -4 $OUT/pytest_qwen3_5.txt
