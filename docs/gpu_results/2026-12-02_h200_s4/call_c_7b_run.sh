#!/usr/bin/env bash
# Call C (after the parts v00..v04, r00, r01 were carried to /tmp/parts): install vLLM 0.25 + Ray,
# then the one-GPU 7B rehearsal (MiMo-7B-RL shapes, random weights, 10 DAPO steps, MTP k=3),
# with GPU and host memory sampled every 0.5 s beside the run's own memory/* metrics.
set -uo pipefail
(cd /tmp/parts && cat v0* | tar x && cat r0* | tar x)
bash scripts/gpu/install_wheels.sh /tmp/site .gpu_wheels /tmp/parts/.gpu_ray /tmp/parts/deps /tmp/parts/nodeps > $OUT/install_vllm.txt 2>&1; tail -1 $OUT/install_vllm.txt
export PYTHONPATH=/tmp/site:$PWD VLLM_ENABLE_V1_MULTIPROCESSING=0 PATH=/tmp/site/bin:$PATH
if [ "${OFFLOAD_TEST:-0}" = 1 ]; then  # the offload equivalence test first (~30 s; docs/scale.md)
  timeout 120 python3 -m pytest -q -p no:cacheprovider -W ignore tests/workers/test_scale_features.py -k offload > $OUT/pytest_offload.txt 2>&1
  tail -1 $OUT/pytest_offload.txt
fi
nvidia-smi --query-gpu=timestamp,memory.used --format=csv,noheader -lms 500 > $OUT/gpu_memory.csv 2>&1 &
sampler=$!
(while true; do echo "$(date +%s.%N) $(free -m | awk '/Mem:/{print $3}')"; sleep 0.5; done) > $OUT/host_memory.txt &
host=$!
MODEL=random PYTHON=python3 timeout ${RUN_TIMEOUT:-500} bash examples/train/spec_decode/mimo_7b_one_gpu_dapo.sh \
  trainer.total_steps=10 trainer.save_every=0 trainer.run_dir=/tmp/run7b "trainer.loggers=[console,jsonl]" > $OUT/run7b.log 2>&1
echo "exit $?" >> $OUT/run7b.log
kill $sampler $host
cp /tmp/run7b/metrics.jsonl /tmp/run7b/summary.md $OUT/ 2>/dev/null
python3 scripts/run_phase_report.py /tmp/run7b/metrics.jsonl > $OUT/phase_report.json 2>&1
tail -5 $OUT/run7b.log
