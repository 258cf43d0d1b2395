#!/usr/bin/env bash
# What the 2026-11-23 GPU session could not fit (docs/gpu.md, "Status"), in the order to run it on
# one H100/H200 after the wheel sets are installed into /tmp/site (docs/gpu.md steps 1-2).
# Each step writes under $OUT; pass the step names to run a subset:
#   OUT=gpu_out bash scripts/gpu/remaining_runs.sh train_step spec_k3 e2e
# On nvidia-h200-x2 also: tp2 (tests/workers/test_policy_parallel.py over NCCL).
set -uo pipefail
out=${OUT:-gpu_out}; mkdir -p "$out"
export PYTHONPATH=/tmp/site:$PWD
steps=${*:-train_step spec_k3 e2e}
for step in $steps; do
  case $step in
    train_step)  # MTP on vs off, ~1B MiMo-shaped model, sequence 4096 (issue 8 item 4)
      timeout 480 python3 scripts/bench_train_step.py > "$out/bench_train_step.json" 2> "$out/bench_train_step.err"
      tail -c 600 "$out/bench_train_step.json" ;;
    spec_k3)  # k=3 of the step-cost sweep, k=0 from the committed report (issue 9 item 2)
      VLLM_USE_V2_MODEL_RUNNER=0 VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_ENABLE_V1_MULTIPROCESSING=0 \
      timeout 300 python3 scripts/bench_spec_decode_cost.py --preset mimo_7b --batches 1,8,32,64,128,256 \
        --ks 0,3 --repeats 3 --max-tokens 128 --baseline docs/gpu_results/2026-11-23_h100/spec_decode_cost.json \
        --out "$out/spec_decode_cost_k3.json" > "$out/spec_k3.log" 2>&1
      tail -c 600 "$out/spec_decode_cost_k3.json" ;;
    e2e)  # both 20-step colocated runs to completion, final export included (issue 9 item 1)
      PYTHON=python3 MTP=1 timeout 420 bash examples/train/spec_decode/small_gpu_dapo.sh > "$out/e2e_mtp.log" 2>&1
      PYTHON=python3 MTP=0 timeout 360 bash examples/train/spec_decode/small_gpu_dapo.sh \
        model.path=runs/small_gpu_dapo_mtp/warm_start trainer.warm_start.enabled=false > "$out/e2e_nomtp.log" 2>&1
      for r in mtp nomtp; do mkdir -p "$out/$r"; cp runs/small_gpu_dapo_$r/{metrics.jsonl,summary.md} "$out/$r/" 2>/dev/null; done
      tail -n 12 "$out/mtp/summary.md" "$out/nomtp/summary.md" ;;
    tp2)  # two GPUs: DP=2 and TP=2 over NCCL, then the TP=2 draft-loss tests (issue 8 item 2)
      python3 -m pytest -q -p no:cacheprovider tests/workers/test_policy_parallel.py tests/mtp/test_losses.py \
        > "$out/tp2_pytest.txt" 2>&1; tail -3 "$out/tp2_pytest.txt" ;;
    *) echo "unknown step $step (train_step, spec_k3, e2e, tp2)"; exit 2 ;;
  esac
done
