"""Weights and measurements shared by the weight-sync tests (not a test module).

- ``peaked_state`` / ``perturbed``: random tiny-preset weights whose greedy argmax gaps dwarf the
  float differences between vLLM's CPU kernels and transformers; ``save_checkpoints`` writes
  one of them and perturbations of it as checkpoints;
- ``fixed_token_target`` + ``with_good_head`` / ``with_random_head``: a target that always emits
  one token and an MTP head that always drafts it (acceptance 1) or never does (acceptance 0);
- ``hf_greedy``: the independent reference, transformers float32 with a plain argmax loop;
- ``greedy_tokens`` / ``acceptance_at_temperature_one``: what a group generates and accepts.
"""

from __future__ import annotations

from pathlib import Path

import torch

from skyrl_mtp.inference.config import SamplingConfig
from skyrl_mtp.models.checkpoint import random_hf_state_dict, save_hf_checkpoint
from skyrl_mtp.models.mimo import get_preset

CFG = get_preset("tiny")
BUCKET_BYTES = 32 << 10  # embed_tokens / lm_head are 256 KiB: each travels as 8 row pieces
FIXED_TOKEN = 77  # the token the constructed target always emits
PROMPTS = [[5, 17, 33, 9], [100, 101, 102, 103, 104, 105], [7, 7, 7], [250, 40, 12, 300, 8], [64, 65]]


# ----------------------------------------------------------------------------------------------
# Weights used by the tests
# ----------------------------------------------------------------------------------------------

def peaked_state(seed: int) -> dict[str, torch.Tensor]:
    """Random weights with a large lm_head, so greedy argmax gaps dwarf float differences between
    vLLM's CPU kernels and transformers."""
    state = random_hf_state_dict(CFG, seed)
    state["lm_head.weight"] *= 100.0
    return state


def perturbed(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in state.items():
        scale = 2.0 if name == "lm_head.weight" else 0.02
        out[name] = t + scale * torch.randn(t.shape, generator=gen)
    return out


def save_checkpoints(root: Path, seed: int, names: str) -> dict:
    """Checkpoints under `root`, one per letter of `names`: the first ``peaked_state(seed)``, the
    i-th after it ``perturbed(first, seed + i)``. Returns each state under its letter and its
    directory under ``<letter>_dir``."""
    first = peaked_state(seed)
    out = {}
    for i, name in enumerate(names):
        out[name] = first if i == 0 else perturbed(first, seed=seed + i)
        save_hf_checkpoint(CFG, out[name], root / name)
        out[f"{name}_dir"] = str(root / name)
    return out


def fixed_token_target(seed: int) -> dict[str, torch.Tensor]:
    """A target that emits FIXED_TOKEN whatever the context: every embedding carries 10 in hidden
    dim 0, the decoder layers' output projections are zero (the residual stream stays the
    embedding), and lm_head row FIXED_TOKEN is 100 * e_0 (logit ~1100 vs ~0.2 for the others)."""
    state = random_hf_state_dict(CFG, seed)
    state["model.embed_tokens.weight"][:, 0] = 10.0
    for i in range(CFG.num_layers):
        state[f"model.layers.{i}.self_attn.o_proj.weight"].zero_()
        state[f"model.layers.{i}.mlp.down_proj.weight"].zero_()
    state["lm_head.weight"][FIXED_TOKEN] = 0.0
    state["lm_head.weight"][FIXED_TOKEN, 0] = 100.0
    return state


def with_good_head(target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MTP head that passes the target's hidden state (dim 0 large) through: input_proj selects the
    hidden half of cat(hidden, embed), its decoder layer adds zero, so its output after
    final_layernorm points along +e_0 and the shared lm_head drafts FIXED_TOKEN."""
    state = dict(target)
    p, h = "model.mtp_layers.0", CFG.hidden_size
    state[f"{p}.self_attn.o_proj.weight"] = torch.zeros(h, h)
    state[f"{p}.mlp.down_proj.weight"] = torch.zeros(h, CFG.ffn_hidden_size)
    state[f"{p}.input_proj.weight"] = torch.cat([torch.eye(h), torch.zeros(h, h)], dim=1)
    return state


def with_random_head(target: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Random MTP weights whose final_layernorm zeroes dim 0, so the head never favours
    FIXED_TOKEN (its logit is exactly 0 while ~500 others are random)."""
    state = dict(target)
    random_state = random_hf_state_dict(CFG, seed)
    for name, t in random_state.items():
        if ".mtp_layers." in name:
            state[name] = t.clone() if not name.endswith("norm.weight") else torch.ones_like(t)
    state["model.mtp_layers.0.final_layernorm.weight"][0] = 0.0
    state["model.mtp_layers.0.input_proj.weight"] = torch.randn(
        CFG.hidden_size, 2 * CFG.hidden_size, generator=torch.Generator().manual_seed(seed)) * 0.2
    return state


def hf_greedy(model_dir: str, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Independent reference: transformers, float32, a plain argmax loop (no generate())."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outs = []
    with torch.no_grad():
        for prompt in prompts:
            ids = list(prompt)
            for _ in range(max_tokens):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            outs.append(ids[len(prompt):])
    return outs


GREEDY = SamplingConfig(temperature=0.0, max_tokens=12, ignore_eos=True)


def greedy_tokens(group) -> list[list[int]]:
    return [samples[0].token_ids for samples in group.generate(PROMPTS, GREEDY)]


def acceptance_at_temperature_one(group) -> dict[str, float]:
    group.metrics.start("train")
    out = group.generate([[5, 6, 7, 8]] * 4 + PROMPTS, SamplingConfig(temperature=1.0, max_tokens=24,
                                                                     ignore_eos=True, seed=7))
    metrics = group.metrics.stop()
    assert all(t == FIXED_TOKEN for samples in out for t in samples[0].token_ids)  # the target is fixed
    assert metrics["vllm/num_draft_tokens"] > 100
    return metrics
