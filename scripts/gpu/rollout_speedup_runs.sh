#!/usr/bin/env bash
# The H200 rollout-speed runs of docs/rollout_speed.md: one engine per (k, settings) in order of
# importance, every finished batch appended to $RS/results.jsonl at once (a cut run keeps them).
# Run from the repo root with vLLM 0.25 importable (docs/gpu.md):
#   RS=/tmp/rs bash scripts/gpu/rollout_speedup_runs.sh [STAGE...]    (default: all stages)
set -uo pipefail
RS=${RS:-/tmp/rs}
mkdir -p "$RS"
export VLLM_USE_V2_MODEL_RUNNER=0 VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_ENABLE_V1_MULTIPROCESSING=0 PYTHONUNBUFFERED=1
# SkyRL's published rates (k=3) and this project's 20-step GPU head (k=3, last 5 steps); the 4th
# position continues each profile's last conditional rate (a4 = a3 * a3 / a2).
SKYRL=skyrl=0.886,0.770,0.663,0.571
PROJECT=project=0.723,0.499,0.234,0.110
bench() {  # bench KS VARIANTS BATCHES [extra args]
  local ks=$1 variants=$2 batches=$3; shift 3
  echo "=== $(date +%T) ks=$ks variants=$variants batches=$batches $*" | tee -a "$RS/stages.txt"
  python3 scripts/bench_rollout_speedup.py --preset mimo_7b --samples 8 --median 400 --sigma 0.8 --cap 2048 \
    --prompt-len 128 --temperature 1.0 --ks "$ks" --variants "$variants" --batches "$batches" \
    --profile "$SKYRL" --profile "$PROJECT" --out "$RS/results.jsonl" "$@"
}
stages=${*:-k0 base3 tuned3 base4 tuned4 base1 base2 tuned1 tuned2 schedule}
for s in $stages; do
  case $s in
    k0) bench 0 default 128,512,32 ;;
    base3) bench 3 default 128,512,32 ;;
    tuned3) bench 3 tuned 512,128 ;;
    base4) bench 4 default 128,512,32 ;;
    tuned4) bench 4 tuned 128,512 ;;
    base1) bench 1 default 128,512,32 ;;
    base2) bench 2 default 128,512,32 ;;
    tuned1) bench 1 tuned 512 ;;
    tuned2) bench 2 tuned 512 ;;
    rep0) bench 0 default 128,128 ;;  # the same batch twice: first-run effects
    rep1) bench 1 default 128,128 ;;
    schedule) bench 3 schedule 128 --schedule 1-16:3,17-64:2,65-1024:1 ;;
    *) echo "unknown stage $s"; exit 2 ;;
  esac
done
echo "=== $(date +%T) done" | tee -a "$RS/stages.txt"
