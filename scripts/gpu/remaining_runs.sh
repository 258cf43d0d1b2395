#!/usr/bin/env bash
# The GPU runs of issues 8 and 9 beyond scripts/gpu/megatron_checks.sh, on one H100/H200 after the
# wheel sets are installed into /tmp/site (docs/gpu.md steps 1-2). Each step writes under $OUT;
# pass the step names to run a subset (one device call is at most 10 minutes):
#   OUT=gpu_out bash scripts/gpu/remaining_runs.sh ipc e2e_mtp
#   OUT=gpu_out bash scripts/gpu/remaining_runs.sh e2e_nomtp spec_k3 train_step
# On nvidia-h200-x2 also: tp2 (tests/workers/test_policy_parallel.py over NCCL).
set -uo pipefail
out=${OUT:-gpu_out}; mkdir -p "$out"
export PYTHONPATH=/tmp/site:$PWD
steps=${*:-ipc e2e_mtp e2e_nomtp spec_k3 train_step}
for step in $steps; do
  case $step in
    ipc)  # CUDA-IPC weight transport between two processes (tests/inference/test_cuda_ipc.py)
      python3 -m pytest -q -p no:cacheprovider -rs tests/inference/test_cuda_ipc.py 2>&1 | tail -3 ;;
    train_step)  # MTP on vs off, ~1B MiMo-shaped model, sequence 4096 (issue 8 item 4)
      timeout 480 python3 scripts/bench_train_step.py > "$out/bench_train_step.json" 2> "$out/bench_train_step.err"
      tail -c 600 "$out/bench_train_step.json" ;;
    spec_k3)  # k=3 of the step-cost sweep; k=0 from the committed report (saves an engine start) (issue 9 item 2)
      VLLM_USE_V2_MODEL_RUNNER=0 VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_ENABLE_V1_MULTIPROCESSING=0 \
      timeout 300 python3 scripts/bench_spec_decode_cost.py --preset mimo_7b --batches 1,8,32,64,128,256 \
        --ks 3 --repeats 3 --max-tokens 128 --baseline docs/gpu_results/2026-11-23_h100/spec_decode_cost.json \
        --out "$out/spec_decode_cost_k3.json" > "$out/spec_k3.log" 2>&1
      tail -c 600 "$out/spec_decode_cost_k3.json" ;;
    e2e_mtp)  # 20 colocated DAPO steps with MTP, final export included (issue 9 item 1)
      PYTHON=python3 MTP=1 timeout 480 bash examples/train/spec_decode/small_gpu_dapo.sh > "$out/e2e_mtp.log" 2>&1
      mkdir -p "$out/mtp"; cp runs/small_gpu_dapo_mtp/{metrics.jsonl,summary.md} "$out/mtp/" 2>/dev/null
      grep -m3 "weight sync\|Error" "$out/e2e_mtp.log"; tail -n 14 "$out/mtp/summary.md" ;;
    e2e_nomtp)  # the same job without MTP, from the MTP run's warm-started checkpoint
      PYTHON=python3 MTP=0 timeout 420 bash examples/train/spec_decode/small_gpu_dapo.sh \
        model.path=runs/small_gpu_dapo_mtp/warm_start trainer.warm_start.enabled=false > "$out/e2e_nomtp.log" 2>&1
      mkdir -p "$out/nomtp"; cp runs/small_gpu_dapo_nomtp/{metrics.jsonl,summary.md} "$out/nomtp/" 2>/dev/null
      grep -m3 "weight sync\|Error" "$out/e2e_nomtp.log"; tail -n 14 "$out/nomtp/summary.md" ;;
    rollout)  # measured rollout speed of the GPU-trained head (after e2e_mtp), k=0..3, one engine per k
      for k in 0 1 2 3; do
        timeout 150 python3 scripts/bench_rollout.py --model runs/small_gpu_dapo_mtp/hf_export --k $k \
          --num-prompts 64 --max-tokens 128 --repeats 3 > "$out/bench_rollout_k$k.json" 2> "$out/bench_rollout_k$k.err"
        tail -c 300 "$out/bench_rollout_k$k.json"; echo
      done ;;
    tp2)  # two GPUs: DP=2 and TP=2 over NCCL (vs TP=1), the TP=2 draft-loss tests, then the
          # invariance tool at TP=2 for every draft loss and its negative control (issue 8 item 2)
      python3 -m pytest -q -p no:cacheprovider tests/workers/test_policy_parallel.py tests/mtp/test_losses.py \
        > "$out/tp2_pytest.txt" 2>&1; tail -3 "$out/tp2_pytest.txt"
      for t in soft_ce topk_soft_ce hard_ce tv; do
        python3 -m skyrl_mtp.tools.check_policy_invariance --steps 5 --tp 2 --loss-type $t 2>/dev/null | tail -1
      done > "$out/invariance_tp2.jsonl"
      python3 -m skyrl_mtp.tools.check_policy_invariance --steps 5 --tp 2 --attach-output-layer 2>/dev/null | tail -1 \
        >> "$out/invariance_tp2.jsonl"; cut -c1-120 "$out/invariance_tp2.jsonl" ;;
    *) echo "unknown step $step (ipc, e2e_mtp, e2e_nomtp, spec_k3, train_step, rollout, tp2)"; exit 2 ;;
  esac
done
