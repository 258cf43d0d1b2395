#!/usr/bin/env bash
# Issue-8 checks on one GPU with megatron-core 0.19.2 (no vLLM): tests on CUDA, the invariance tool
# for every draft loss, the draft-loss and train-step benchmarks. Results go to $OUT (or ./gpu_out).
#   bash scripts/gpu/install_wheels.sh /tmp/site .gpu_wheels && PYTHONPATH=/tmp/site:$PWD bash scripts/gpu/megatron_checks.sh
set -uo pipefail
out=${OUT:-gpu_out}; mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
python3 -c "import torch, megatron.core; from skyrl_mtp.megatron import compat; compat.check_supported(); \
print('torch', torch.__version__, 'megatron-core', megatron.core.__version__, 'native output_processor', compat.has_native_output_processor())" \
  2>&1 | tee "$out/versions.txt"
python3 -m pytest -q -p no:cacheprovider tests/megatron tests/mtp tests/workers/test_policy.py 2>&1 | tail -40 > "$out/pytest.txt"
tail -3 "$out/pytest.txt"
for t in soft_ce topk_soft_ce hard_ce tv; do
  python3 -m skyrl_mtp.tools.check_policy_invariance --steps 5 --loss-type "$t" 2>/dev/null | tail -1 >> "$out/invariance.jsonl"
done
python3 -m skyrl_mtp.tools.check_policy_invariance --steps 5 --attach-output-layer 2>/dev/null | tail -1 > "$out/invariance_negative_control.json"
cat "$out/invariance.jsonl" "$out/invariance_negative_control.json"
python3 scripts/bench_draft_loss.py 2>&1 | tail -1 > "$out/bench_draft_loss.json"; tail -c 600 "$out/bench_draft_loss.json"
python3 scripts/bench_train_step.py 2>&1 | tail -1 > "$out/bench_train_step.json"; cat "$out/bench_train_step.json"
