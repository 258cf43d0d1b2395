#!/usr/bin/env bash
# A/B of trainer.mtp.microbatch_share on the CPU demo with the policy frozen (lr 1e-12): the heads
# distil the same warm-started policy and are measured on its rollouts.
cd /tmp/ab/src
for share in 1.0 0.5 0.25; do
  PYTHON=/work/main/.venv/bin/python bash examples/train/spec_decode/tiny_cpu_dapo.sh trainer.total_steps=40 \
    trainer.eval_every=0 trainer.save_every=0 trainer.optim.lr=1e-12 trainer.mtp.microbatch_share=$share \
    "trainer.loggers=[console,jsonl]" trainer.run_dir=/tmp/ab/share_$share > /tmp/ab/share_$share.log 2>&1
  echo "share $share exit $?" >> /tmp/ab/done.txt
done
