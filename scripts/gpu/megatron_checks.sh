#!/usr/bin/env bash
# Issue-8 checks on one GPU with megatron-core 0.19.2 (no vLLM needed): tests on CUDA, the invariance
# tool for every draft loss (+ its negative control), the draft-loss and train-step benchmarks.
# Results go to $OUT (default ./gpu_out). Needs transformers' huggingface_hub deps (httpx2 comes with
# the vLLM wheel set), see docs/gpu.md.
#   PYTHONPATH=/tmp/site:$PWD bash scripts/gpu/megatron_checks.sh
set -uo pipefail
out=${OUT:-gpu_out}; mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
python3 -c "import torch, megatron.core; from skyrl_mtp.megatron import compat; compat.check_supported(); \
print('torch', torch.__version__, 'megatron-core', megatron.core.__version__, 'native output_processor', compat.has_native_output_processor())" \
  > "$out/versions.txt" 2>&1
tail -1 "$out/versions.txt"
python3 -m pytest -q -p no:cacheprovider -W ignore tests/megatron tests/mtp tests/workers/test_policy.py > "$out/pytest.txt" 2>&1
tail -2 "$out/pytest.txt"
for t in soft_ce topk_soft_ce hard_ce tv; do
  python3 -m skyrl_mtp.tools.check_policy_invariance --steps 5 --loss-type "$t" >> "$out/invariance.jsonl" 2>> "$out/invariance.err"
done
python3 -m skyrl_mtp.tools.check_policy_invariance --steps 5 --attach-output-layer > "$out/invariance_negative_control.json" 2>> "$out/invariance.err"
cut -c1-160 "$out/invariance.jsonl" "$out/invariance_negative_control.json"
python3 scripts/bench_draft_loss.py > "$out/bench_draft_loss.json" 2> "$out/bench_draft_loss.err"; head -c 300 "$out/bench_draft_loss.json"; echo
python3 scripts/bench_train_step.py > "$out/bench_train_step.json" 2> "$out/bench_train_step.err"; cat "$out/bench_train_step.json"
