"""Megatron (CPU) numerics vs independent references on the same weights.

- trunk logits vs transformers' Qwen2ForCausalLM (float32)
- trunk logits and MTP depth-1 logits vs a float64 re-implementation written here from the
  MiMo architecture (the MTP layer as vLLM's MiMo drafter computes it)
- replayed MTP hidden states vs Megatron's native GPTModel+MTP block
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from skyrl_mtp.megatron.bridge import load_module_state, make_bridge, split_trunk_and_mtp
from skyrl_mtp.megatron.model_builder import (
    build_mtp_block, build_native_gpt_with_mtp, build_trunk, causal_mask)
from skyrl_mtp.models.checkpoint import load_hf_state_dict, random_hf_state_dict
from skyrl_mtp.models.mimo import MimoConfig, get_preset
from skyrl_mtp.mtp.replay import MtpCapture, mtp_logits, replay_mtp

B, S = 3, 14
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # GPU runs: docs/gpu.md


# ----------------------------------------------------------------------------- float64 reference
def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x, pos, theta):
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos[..., None].double() * inv
    cos, sin = torch.cat([ang, ang], -1).cos()[:, :, None], torch.cat([ang, ang], -1).sin()[:, :, None]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def _decoder_layer(x, w, p, cfg, pos):
    b, s, _ = x.shape
    d, nh, nkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_query_groups
    h = _rms(x, w[f"{p}.input_layernorm.weight"], cfg.rms_norm_eps)
    a = f"{p}.self_attn"
    q = (h @ w[f"{a}.q_proj.weight"].T + w[f"{a}.q_proj.bias"]).view(b, s, nh, d)
    k = (h @ w[f"{a}.k_proj.weight"].T + w[f"{a}.k_proj.bias"]).view(b, s, nkv, d)
    v = (h @ w[f"{a}.v_proj.weight"].T + w[f"{a}.v_proj.bias"]).view(b, s, nkv, d)
    q, k = _rope(q, pos, cfg.rope_theta), _rope(k, pos, cfg.rope_theta)
    k = k.repeat_interleave(nh // nkv, dim=2)
    v = v.repeat_interleave(nh // nkv, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / d ** 0.5
    scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    attn = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(b, s, nh * d)
    x = x + attn @ w[f"{a}.o_proj.weight"].T
    h = _rms(x, w[f"{p}.post_attention_layernorm.weight"], cfg.rms_norm_eps)
    m = f"{p}.mlp"
    return x + (F.silu(h @ w[f"{m}.gate_proj.weight"].T) * (h @ w[f"{m}.up_proj.weight"].T)) @ w[f"{m}.down_proj.weight"].T


def reference_mimo(w, cfg, ids):
    """float64 (trunk logits [b,s,V], MTP depth-1 logits [b,s-1,V]) in vLLM MiMo semantics."""
    w = {k: v.double() for k, v in w.items()}
    lm_head = w["model.embed_tokens.weight"] if cfg.tie_word_embeddings else w["lm_head.weight"]
    b, s = ids.shape
    pos = torch.arange(s)[None].expand(b, -1)
    x = w["model.embed_tokens.weight"][ids]
    for i in range(cfg.num_layers):
        x = _decoder_layer(x, w, f"model.layers.{i}", cfg, pos)
    hidden = _rms(x, w["model.norm.weight"], cfg.rms_norm_eps)
    trunk_logits = hidden @ lm_head.T
    # MTP at position t: hidden of t and the embedding of token t+1 (zeroed where t == 0).
    p = "model.mtp_layers.0"
    emb = w["model.embed_tokens.weight"][ids[:, 1:]]
    emb[:, 0] = 0.0
    h_in = torch.cat([_rms(hidden[:, :-1], w[f"{p}.hidden_layernorm.weight"], cfg.rms_norm_eps),
                      _rms(emb, w[f"{p}.token_layernorm.weight"], cfg.rms_norm_eps)], -1)
    y = _decoder_layer(h_in @ w[f"{p}.input_proj.weight"].T, w, p, cfg, pos[:, :-1])
    y = _rms(y, w[f"{p}.final_layernorm.weight"], cfg.rms_norm_eps)
    return trunk_logits, y @ lm_head.T


# ----------------------------------------------------------------------------- Megatron side
def _megatron_models(cfg, hf):
    trunk_state, head_state = split_trunk_and_mtp(make_bridge(cfg).hf_to_megatron(hf))
    trunk, head = build_trunk(cfg), build_mtp_block(cfg)
    load_module_state(trunk, trunk_state, what="trunk")
    load_module_state(head, head_state, what="mtp head")
    return trunk.eval(), head.eval()


def _megatron_logits(trunk, head, ids, zero_first=True):
    capture = MtpCapture().attach(trunk)

    def processor(**kw):
        hidden = replay_mtp(head, trunk.embedding, hidden_states=kw["hidden_states"], input_ids=kw["input_ids"],
                            position_ids=kw["position_ids"], attention_mask=kw["attention_mask"],
                            rotary_pos_emb=capture.rotary_pos_emb, zero_first_embedding=zero_first)
        logits, _ = kw["output_layer"](kw["hidden_states"], weight=kw["output_weight"])
        return logits.transpose(0, 1), mtp_logits(kw["output_layer"], hidden[0], kw["output_weight"]), hidden[0]

    ids = ids.to(DEVICE)
    pos = torch.arange(ids.shape[1], device=DEVICE)[None].expand(ids.shape[0], -1)
    with torch.no_grad():
        out = trunk(ids, pos, causal_mask(ids.shape[1], device=DEVICE), output_processor=processor,
                    output_processor_context=None)
    capture.detach_hook()
    return tuple(t.float().cpu() for t in out)


@pytest.fixture(scope="module")
def tiny(megatron_single, tiny_ckpt):
    cfg = MimoConfig.from_pretrained(tiny_ckpt)
    return cfg, load_hf_state_dict(tiny_ckpt)


def _ids(cfg, seed=0):
    return torch.randint(4, cfg.vocab_size, (B, S), generator=torch.Generator().manual_seed(seed))


def test_trunk_logits_match_transformers(tiny, tiny_ckpt):
    from transformers import AutoModelForCausalLM

    cfg, hf = tiny
    trunk, head = _megatron_models(cfg, hf)
    ids = _ids(cfg)
    logits, _, _ = _megatron_logits(trunk, head, ids)
    ref = AutoModelForCausalLM.from_pretrained(str(tiny_ckpt), dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(ids).logits
    assert (logits[..., : cfg.vocab_size] - want).abs().max().item() <= 1e-4


@pytest.mark.parametrize("tied", [False, True])
def test_trunk_and_mtp_logits_match_float64_reference(megatron_single, tied):
    cfg = get_preset("tiny").replace(tie_word_embeddings=tied, init_std=0.2)  # larger weights: a sharper test
    hf = random_hf_state_dict(cfg, seed=11)
    hf = {k: (v + 0.1 * torch.randn_like(v)) if v.dim() == 1 else v for k, v in hf.items()}
    trunk, head = _megatron_models(cfg, hf)
    ids = _ids(cfg, seed=1)
    logits, mtp, _ = _megatron_logits(trunk, head, ids)
    want_logits, want_mtp = reference_mimo(hf, cfg, ids)
    assert (logits.double() - want_logits).abs().max().item() <= 1e-4
    # Megatron's last MTP position has no next token (rolled-in id 0): compare the s-1 real ones.
    assert (mtp[:, :-1].double() - want_mtp).abs().max().item() <= 1e-4
    # vLLM's drafter zeroes position 0's embedding; without that the head output differs.
    _, mtp_plain, _ = _megatron_logits(trunk, head, ids, zero_first=False)
    assert (mtp_plain[:, :-1].double() - want_mtp).abs().max().item() > 1e-3


def test_replay_equals_native_mtp_block(tiny):
    cfg, hf = tiny
    trunk, head = _megatron_models(cfg, hf)
    native = build_native_gpt_with_mtp(cfg)
    load_module_state(native, make_bridge(cfg).hf_to_megatron(hf), what="native")
    native.eval()
    captured = {}
    native.mtp.register_forward_hook(lambda _m, _a, out: captured.__setitem__("out", out))
    ids = _ids(cfg, seed=2)
    pos = torch.arange(S, device=DEVICE)[None].expand(B, -1)
    with torch.no_grad():
        native(ids.to(DEVICE), pos, causal_mask(S, device=DEVICE), labels=ids.to(DEVICE))  # 0.16 needs labels
    native_hidden = torch.chunk(captured["out"], 2, dim=0)[1].float().cpu()
    _, _, replayed = _megatron_logits(trunk, head, ids, zero_first=False)
    assert (replayed - native_hidden).abs().max().item() <= 1e-6
