#!/usr/bin/env bash
# Call D (after the parts t00..t04 were carried to /tmp/parts and .gpu_fla with the last one):
# the qwen3_5 hybrid on the H200. Triton 3.9 goes into its own folder ahead of the image's 3.6
# (fla's Hopper backward needs >= 3.7.1); the policy tests and the invariance run with it. Then the
# RL loop at small shapes (qwen3_5_tiny on the sort task, vLLM 0.25 qwen3_5_mtp drafting k=2).
set -uo pipefail
(cd /tmp/parts && cat t0* | tar x)
python3 -m pip install -q --no-index --no-deps --target /tmp/triton39 /tmp/parts/gpu_triton/*.whl > $OUT/install_triton.txt 2>&1
bash scripts/gpu/install_wheels.sh /tmp/site .gpu_fla >> $OUT/install_triton.txt 2>&1; tail -1 $OUT/install_triton.txt
export PYTHONPATH=/tmp/triton39:/tmp/site:$PWD VLLM_ENABLE_V1_MULTIPROCESSING=0 PATH=/tmp/site/bin:$PATH
python3 -c "
import torch, triton, fla, megatron.core
from skyrl_mtp.megatron.qwen3_5 import gdn_module
print('triton', triton.__version__, 'fla', fla.__version__, 'megatron-core', megatron.core.__version__, 'gdn_module', gdn_module().__module__, gdn_module().__name__)
" > $OUT/versions.txt 2>&1; tail -1 $OUT/versions.txt
timeout 200 python3 -m pytest -q -p no:cacheprovider -W ignore tests/megatron/test_qwen3_5.py tests/workers/test_qwen3_5_policy.py > $OUT/pytest_qwen3_5.txt 2>&1; tail -2 $OUT/pytest_qwen3_5.txt
for dt in float32 bfloat16; do
  timeout 120 python3 -m skyrl_mtp.tools.check_policy_invariance --steps 3 --preset qwen3_5_tiny --dtype $dt > $OUT/invariance_qwen3_5_$dt.json 2> $OUT/invariance_qwen3_5_$dt.err
  cut -c1-300 $OUT/invariance_qwen3_5_$dt.json; grep -E "Error" $OUT/invariance_qwen3_5_$dt.err | tail -2
done
timeout ${RUN_TIMEOUT:-240} python3 -m skyrl_mtp.train algorithm=dapo model=qwen3_5_tiny data=sort generator=gpu megatron=gpu \
  generator.enable_prefix_caching=false trainer.mtp.enabled=true trainer.mtp.num_speculative_tokens=2 trainer.mtp.loss_type=tv \
  generator.draft_sample_method=probabilistic generator.num_gpus_per_engine=0.5 megatron.num_gpus_per_worker=0.5 \
  generator.gpu_memory_utilization=0.3 generator.max_response_length=40 generator.max_model_len=256 \
  trainer.total_steps=10 trainer.warm_start.steps=200 trainer.warm_start.lr=5e-4 trainer.ppo_mini_batch_size=4 \
  trainer.optim.lr=2e-4 trainer.eval_every=5 trainer.save_every=0 "trainer.loggers=[console,jsonl]" \
  trainer.run_dir=/tmp/runq trainer.experiment_name=qwen3_5_tiny_gpu_dapo > $OUT/run_qwen3_5.log 2>&1
echo "exit $?" >> $OUT/run_qwen3_5.log; cp /tmp/runq/metrics.jsonl $OUT/metrics_qwen3_5.jsonl 2>/dev/null; tail -4 $OUT/run_qwen3_5.log
