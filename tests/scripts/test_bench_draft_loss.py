"""scripts/bench_draft_loss.py, projection mode: several fused chunk sizes side by side, each checked
against the script's float64 reference. On CPU the fused kernels run under Triton's interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("loss_type", ["topk_soft_ce", "tv"])
def test_fused_chunk_sizes_side_by_side_match_the_fp64_reference(loss_type):
    pytest.importorskip("triton")
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_draft_loss.py"), "--device", "cpu", "--dtype", "float32",
           "--vocab", "300", "--seq", "48", "--hidden", "16", "--topk", "8", "--repeats", "1",
           "--fused-chunk-rows", "16", "32", "--loss-types", loss_type, "--fp64-check", "--variants", "fused", "fused_teacher_hidden"]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    report = json.loads("\n".join(lines[lines.index("{"):]))  # after the per-loss progress line
    assert report["config"]["fused_chunk_rows"] == [16, 32]
    results = report["results"][loss_type]
    # 48 rows in chunks of 16 and of 32 (the last one partial); teacher as logits and as hidden states
    assert set(results) == {"fused_rows16", "fused_rows32", "fused_teacher_hidden_rows16", "fused_teacher_hidden_rows32"}
    for name, result in results.items():
        assert result["loss_rel_err_vs_fp64"] < 1e-6, (name, result)
        assert result["grad_rel_err_vs_fp64"] < 1e-5, (name, result)
    assert results["fused_rows16"]["loss"] == pytest.approx(results["fused_rows32"]["loss"], rel=1e-6)
