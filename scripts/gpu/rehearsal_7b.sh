#!/usr/bin/env bash
# Issue 15's one-GPU 7B rehearsal on a GPU test machine (docs/gpu.md): MiMo-7B-RL shapes with random
# weights, DAPO with MTP drafting k=3, policy and vLLM engine colocated, GPU-to-GPU weight sync.
#   OUT=$OUT bash scripts/gpu/rehearsal_7b.sh install   # after the parts v00..v06, r00, r01 reached /tmp/parts
#   OUT=$OUT bash scripts/gpu/rehearsal_7b.sh run [overrides...]
# Two calls, because one 10-minute call did not hold install + start-up + 10 steps on the machine
# of 2026-12-02 s5 (install 70 s, start-up ~280 s, first step 111 s, then ~26 s a step). In s6 the run
# went detached between short calls (docs/gpu.md).
# The run samples GPU and host memory every 0.5 s, copies metrics.jsonl to $OUT every 5 s (so a
# call cut short still returns the steps done), and the actors' logs at the end.
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=/tmp/site:$PWD VLLM_ENABLE_V1_MULTIPROCESSING=0 PATH=/tmp/site/bin:$PATH
case ${1:?usage: $0 install|run [overrides...]} in
  install)
    (cd /tmp/parts && cat v0* | tar x && cat r0* | tar x)
    bash scripts/gpu/install_wheels.sh /tmp/site .gpu_wheels /tmp/parts/.gpu_ray /tmp/parts/deps /tmp/parts/nodeps \
      > "$OUT/install_vllm.txt" 2>&1
    tail -1 "$OUT/install_vllm.txt"
    python3 -c "import vllm, ray, megatron.core; print('vllm', vllm.__version__, 'ray', ray.__version__, 'megatron-core', megatron.core.__version__)" ;;
  run)
    shift
    nvidia-smi --query-gpu=timestamp,memory.used --format=csv,noheader -lms 500 > "$OUT/gpu_memory.csv" 2>&1 &
    samplers=($!)
    (while true; do echo "$(date +%s.%N) $(free -m | awk '/Mem:/{print $3}')"; sleep 0.5; done) > "$OUT/host_memory.txt" &
    samplers+=($!)
    (while true; do sleep 5; cp /tmp/run7b/metrics.jsonl "$OUT/" 2>/dev/null; done) &
    samplers+=($!)
    MODEL=random PYTHON=python3 timeout "${RUN_TIMEOUT:-560}" bash examples/train/spec_decode/mimo_7b_one_gpu_dapo.sh \
      trainer.total_steps=10 trainer.save_every=0 trainer.run_dir=/tmp/run7b "trainer.loggers=[console,jsonl]" "$@" \
      > "$OUT/run7b.log" 2>&1
    echo "exit $?" >> "$OUT/run7b.log"
    kill "${samplers[@]}"
    cp /tmp/run7b/metrics.jsonl /tmp/run7b/summary.md "$OUT/" 2>/dev/null
    # the final export: its index and files (the sixth session's run died here, host out of memory)
    (cp /tmp/run7b/hf_export/model.safetensors.index.json "$OUT/" && ls -l /tmp/run7b/hf_export) > "$OUT/hf_export.txt" 2>&1
    tar czf "$OUT/actor_logs.tgz" -C /tmp/run7b logs 2>/dev/null
    python3 scripts/run_phase_report.py /tmp/run7b/metrics.jsonl > "$OUT/phase_report.json" 2>&1
    grep -v "logging.cc" "$OUT/run7b.log" | tail -5 ;;
  *) echo "unknown action '$1': use install or run" >&2; exit 2 ;;
esac
