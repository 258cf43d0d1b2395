#!/usr/bin/env bash
# A/B of trainer.mtp.depth_attention on the CPU demo with the policy frozen (lr 1e-12): the heads
# distil the same warm-started policy and are measured on its rollouts; k=2 (the demo's) and k=3.
cd /tmp/ab2/src   # a git archive of 43b5c4e
for k in 2 3; do
  for mode in causal drafter_cache; do
    PYTHON=/work/main/.venv/bin/python bash examples/train/spec_decode/tiny_cpu_dapo.sh trainer.total_steps=40 \
      trainer.eval_every=0 trainer.save_every=0 trainer.optim.lr=1e-12 trainer.mtp.num_speculative_tokens=$k \
      trainer.mtp.depth_attention=$mode "trainer.loggers=[console,jsonl]" trainer.run_dir=/tmp/ab2/k${k}_$mode \
      > /tmp/ab2/k${k}_$mode.log 2>&1
    echo "k=$k $mode exit $? $(date +%T)" >> /tmp/ab2/done.txt
  done
done
