#!/usr/bin/env bash
# Issue 18's GPU part on a GPU test machine (docs/gpu.md): the qwen3_5 hybrid at small shapes with
# fla's Gated DeltaNet kernels. Needs the parts t00..t04 in /tmp/parts and .gpu_fla carried; the
# RL loop also needs the vLLM set (`rehearsal_7b.sh install`).
#   OUT=$OUT bash scripts/gpu/qwen3_5_small.sh install   # Triton 3.7.1 (fla 0.5.2 needs >= 3.7.1, < 3.9) + fla
#   OUT=$OUT bash scripts/gpu/qwen3_5_small.sh check       # the qwen3_5 test files
#   OUT=$OUT bash scripts/gpu/qwen3_5_small.sh invariance  # check_policy_invariance bf16, then fp32
#   OUT=$OUT bash scripts/gpu/qwen3_5_small.sh run [overrides...]  # 10 DAPO steps of qwen3_5_tiny with qwen3_5_mtp drafting k=2
# fla autotunes its kernels on first use: on the 2026-12-02 s6 machine the test files took over 200 s
# and each invariance run over 120 s. Long actions can run detached between short calls:
#   (OUT=/tmp/q_out setsid nohup bash scripts/gpu/qwen3_5_small.sh check > /tmp/q_out/driver.txt 2>&1 &)
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=/tmp/triton:/tmp/site:$PWD VLLM_ENABLE_V1_MULTIPROCESSING=0 PATH=/tmp/site/bin:$PATH
mkdir -p "$OUT"
case ${1:?usage: $0 install|check|invariance|run [overrides...]} in
  install)
    (cd /tmp/parts && cat t0* | tar x)
    python3 -m pip install -q --no-index --no-deps --target /tmp/triton /tmp/parts/gpu_triton/*.whl > "$OUT/install_triton.txt" 2>&1
    bash scripts/gpu/install_wheels.sh /tmp/site .gpu_fla >> "$OUT/install_triton.txt" 2>&1
    python3 -c "
import triton, fla, megatron.core
from skyrl_mtp.megatron.qwen3_5 import gdn_module
print('triton', triton.__version__, 'fla', fla.__version__, 'megatron-core', megatron.core.__version__, 'gdn', gdn_module().__module__)
" 2>&1 | tail -1 | tee "$OUT/versions.txt" ;;
  check)
    # One pytest per file, each with its own timeout: on 2026-12-03 the policy file hung for minutes in
    # a Triton compile (ptxas) and SIGINT did not stop it, so the megatron file's failure was never
    # printed. SIGINT first (pytest then prints the failures it has), KILL 30 s later.
    for f in tests/megatron/test_qwen3_5.py tests/workers/test_qwen3_5_policy.py; do
      timeout -s INT -k 30 "${TEST_TIMEOUT:-500}" python3 -m pytest -q -p no:cacheprovider -W ignore -rf --tb=short \
        "$f" > "$OUT/pytest_$(basename "$f" .py).txt" 2>&1
      tail -3 "$OUT/pytest_$(basename "$f" .py).txt"
    done ;;
  invariance)
    for dt in bfloat16 float32; do
      timeout 300 python3 -m skyrl_mtp.tools.check_policy_invariance --steps 3 --preset qwen3_5_tiny --dtype $dt \
        > "$OUT/invariance_qwen3_5_$dt.json" 2> "$OUT/invariance_qwen3_5_$dt.err"
      tail -1 "$OUT/invariance_qwen3_5_$dt.json" | cut -c1-200
    done ;;
  run)
    shift  # the rest: Hydra overrides (e.g. generator.enforce_eager=true)
    timeout "${RUN_TIMEOUT:-500}" python3 -m skyrl_mtp.train algorithm=dapo model=qwen3_5_tiny data=sort generator=gpu megatron=gpu \
      generator.enable_prefix_caching=false trainer.mtp.enabled=true trainer.mtp.num_speculative_tokens=2 trainer.mtp.loss_type=tv \
      generator.draft_sample_method=probabilistic generator.num_gpus_per_engine=0.5 megatron.num_gpus_per_worker=0.5 \
      generator.gpu_memory_utilization=0.3 generator.max_response_length=40 generator.max_model_len=256 \
      trainer.total_steps=10 trainer.warm_start.steps=200 trainer.warm_start.lr=5e-4 trainer.ppo_mini_batch_size=4 \
      trainer.optim.lr=2e-4 trainer.eval_every=5 trainer.save_every=0 "trainer.loggers=[console,jsonl]" \
      trainer.run_dir=/tmp/runq trainer.experiment_name=qwen3_5_tiny_gpu_dapo "$@" > "$OUT/run_qwen3_5.log" 2>&1
    echo "exit $?" >> "$OUT/run_qwen3_5.log"
    cp /tmp/runq/metrics.jsonl "$OUT/metrics_qwen3_5.jsonl" 2>/dev/null
    grep -v "logging.cc" "$OUT/run_qwen3_5.log" | tail -4 ;;
  *) echo "unknown action '$1': use install, check, invariance or run" >&2; exit 2 ;;
esac
