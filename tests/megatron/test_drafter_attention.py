"""The head's replay at draft depths >= 2 with ``depth_attention='drafter_cache'`` against a float64
re-implementation of vLLM's drafting loop, written here query by query with an explicit KV cache:
for each base position i, the depth-1 pass over positions 0..i fills the cache, then draft step d
runs one query at position i + d - 1 over that cache plus its own chain's entries (the proposer's
loop in vLLM's spec_decode/llm_base_proposer.py, with the MiMo MTP layer of vllm/model_executor/
models/mimo_mtp.py). Teacher-forced: the step-d input token is the sequence's own token i + d, as
in training.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from skyrl_mtp.megatron.drafter_attention import drafter_attention
from skyrl_mtp.megatron.model_builder import causal_mask
from skyrl_mtp.megatron.packed_attention import packed_seq_params
from skyrl_mtp.models.checkpoint import random_hf_state_dict
from skyrl_mtp.models.mimo import get_preset
from skyrl_mtp.mtp.replay import MtpCapture, replay_mtp
from tests.megatron.test_packed_attention import _models

B, S, DEPTHS = 2, 12, 3


# ----------------------------------------------------------------------------- float64 drafting loop
def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x, pos, theta):  # x [heads, dim] at one position
    d = x.shape[-1]
    ang = pos * (1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    cos, sin = torch.cat([ang, ang]).cos(), torch.cat([ang, ang]).sin()
    return x * cos + torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1) * sin


class _DrafterStep:
    """One MiMo MTP layer step for one token: input projection, attention over a given cache, MLP."""

    def __init__(self, w, cfg):
        self.w, self.cfg, self.p = w, cfg, "model.mtp_layers.0"

    def inputs(self, prev_hidden, token, zero):
        w, p, eps = self.w, self.p, self.cfg.rms_norm_eps
        emb = w["model.embed_tokens.weight"][token] * (0.0 if zero else 1.0)
        x = torch.cat([_rms(prev_hidden, w[f"{p}.hidden_layernorm.weight"], eps),
                       _rms(emb, w[f"{p}.token_layernorm.weight"], eps)])
        return x @ w[f"{p}.input_proj.weight"].T

    def key_value(self, x, pos):
        w, a, c = self.w, f"{self.p}.self_attn", self.cfg
        h = _rms(x, w[f"{self.p}.input_layernorm.weight"], c.rms_norm_eps)
        q = (h @ w[f"{a}.q_proj.weight"].T + w[f"{a}.q_proj.bias"]).view(c.num_attention_heads, c.head_dim)
        k = (h @ w[f"{a}.k_proj.weight"].T + w[f"{a}.k_proj.bias"]).view(c.num_query_groups, c.head_dim)
        v = (h @ w[f"{a}.v_proj.weight"].T + w[f"{a}.v_proj.bias"]).view(c.num_query_groups, c.head_dim)
        return _rope(q, pos, c.rope_theta), _rope(k, pos, c.rope_theta), v

    def output(self, x, q, keys, values):
        """keys / values: lists of [groups, dim] entries the query may read."""
        w, p, c = self.w, self.p, self.cfg
        rep = c.num_attention_heads // c.num_query_groups
        k = torch.stack(keys).repeat_interleave(rep, dim=1)  # [n, heads, dim]
        v = torch.stack(values).repeat_interleave(rep, dim=1)
        probs = (torch.einsum("hd,nhd->hn", q, k) / c.head_dim ** 0.5).softmax(-1)
        attn = torch.einsum("hn,nhd->hd", probs, v).reshape(-1)
        x = x + attn @ w[f"{p}.self_attn.o_proj.weight"].T
        h = _rms(x, w[f"{p}.post_attention_layernorm.weight"], c.rms_norm_eps)
        m = f"{p}.mlp"
        gated = F.silu(h @ w[f"{m}.gate_proj.weight"].T) * (h @ w[f"{m}.up_proj.weight"].T)
        x = x + gated @ w[f"{m}.down_proj.weight"].T
        return _rms(x, w[f"{p}.final_layernorm.weight"], c.rms_norm_eps)


def reference_drafts(w, cfg, trunk_hidden, ids, depths):
    """float64 [depth][b, i] -> the drafter's output hidden state for base position i at that depth."""
    w = {k: v.double() for k, v in w.items()}
    step = _DrafterStep(w, cfg)
    b, s = ids.shape
    out = [torch.zeros(b, s - d, cfg.hidden_size, dtype=torch.float64) for d in range(1, depths + 1)]
    for row in range(b):
        hidden = trunk_hidden[row].double()
        # The first draft step over the context: depth-1 states, their keys / values cached.
        cache_k, cache_v, depth1 = [], [], []
        for i in range(s - 1):
            x = step.inputs(hidden[i], ids[row, i + 1], zero=(i == 0))
            q, k, v = step.key_value(x, float(i))
            cache_k.append(k)
            cache_v.append(v)
            depth1.append(step.output(x, q, cache_k, cache_v))
        for i in range(s - 1):
            out[0][row, i] = depth1[i]
            prev, chain_k, chain_v = depth1[i], [], []
            for d in range(2, depths + 1):  # later steps: one query at position i + d - 1
                if i + d >= s:
                    break
                x = step.inputs(prev, ids[row, i + d], zero=False)
                q, k, v = step.key_value(x, float(i + d - 1))
                chain_k.append(k)
                chain_v.append(v)
                prev = step.output(x, q, cache_k[: i + 1] + chain_k, cache_v[: i + 1] + chain_v)
                out[d - 1][row, i] = prev
    return out


# ----------------------------------------------------------------------------- Megatron replay
@pytest.fixture(scope="module")
def models(megatron_single):
    cfg = get_preset("tiny").replace(init_std=0.2)  # larger weights: attention far from uniform
    hf = random_hf_state_dict(cfg, seed=5)
    hf = {k: (v + 0.1 * torch.randn_like(v)) if v.dim() == 1 else v for k, v in hf.items()}
    return cfg, hf, *_models(cfg, hf, packed=False)


def _replay(trunk, head, ids, depth_attention, packed=None):
    capture = MtpCapture().attach(trunk)
    seen = {}

    def processor(**kw):
        seen["trunk_hidden"] = kw["hidden_states"]
        return replay_mtp(head, trunk.embedding, hidden_states=kw["hidden_states"], input_ids=kw["input_ids"],
                          position_ids=kw["position_ids"], attention_mask=kw["attention_mask"],
                          rotary_pos_emb=capture.rotary_pos_emb, packed_seq_params=kw.get("packed_seq_params"),
                          num_depths=DEPTHS, zero_first_embedding=True, depth_attention=depth_attention,
                          capture=capture)

    s = ids.shape[1]
    if packed is None:
        pos = torch.arange(s)[None].expand(ids.shape[0], -1)
        kwargs = {}
    else:
        pos = torch.cat([torch.arange(n) for n in packed])[None]
        kwargs = {"packed_seq_params": packed_seq_params(packed, "cpu")}
    with torch.no_grad():
        hidden = trunk(ids, pos, causal_mask(s), output_processor=processor, output_processor_context=None, **kwargs)
    capture.detach_hook()
    return [h.transpose(0, 1).double() for h in hidden], seen["trunk_hidden"].transpose(0, 1)


def test_drafter_cache_replay_matches_vllm_drafting_loop(models):
    cfg, hf, trunk, head = models
    ids = torch.randint(4, cfg.vocab_size, (B, S), generator=torch.Generator().manual_seed(3))
    replayed, trunk_hidden = _replay(trunk, head, ids, "drafter_cache")
    want = reference_drafts(hf, cfg, trunk_hidden, ids, DEPTHS)
    for d in range(DEPTHS):
        got = replayed[d][:, : S - d - 1]  # the last position's rolled-in token is not real
        assert (got - want[d][:, : S - d - 1]).abs().max().item() <= 1e-4, d
    # The causal replay is what the native block computes: equal at depth 1, not the drafter from depth 2.
    causal, _ = _replay(trunk, head, ids, "causal")
    assert (causal[0] - replayed[0]).abs().max().item() == 0.0
    assert (causal[1][:, : S - 2] - want[1][:, : S - 2]).abs().max().item() > 1e-2


def test_drafter_cache_keeps_packed_sequences_apart(models):
    cfg, hf, trunk, head = models
    lengths = [7, 5]
    ids = torch.randint(4, cfg.vocab_size, (1, sum(lengths)), generator=torch.Generator().manual_seed(4))
    packed, _ = _replay(*_models(cfg, hf, packed=True), ids, "drafter_cache", packed=lengths)
    start = 0
    for n in lengths:
        alone, _ = _replay(trunk, head, ids[:, start:start + n], "drafter_cache")
        for d in range(DEPTHS):  # positions whose rolled tokens stay inside the sequence
            a, b = packed[d][:, start:start + n - d - 1], alone[d][:, : n - d - 1]
            assert (a - b).abs().max().item() <= 1e-5, (n, d)
        start += n


def test_drafter_attention_gradients_match_a_per_query_loop():
    """The batched attention (causal cache + chain diagonal) against a float64 loop over queries,
    values and gradients w.r.t. the query and the chain's own key / value (the cache is detached)."""
    g = torch.Generator().manual_seed(0)
    s, b, heads, groups, dim, scale = 6, 2, 4, 2, 8, 8 ** -0.5
    q = torch.randn(s, b, heads, dim, generator=g, dtype=torch.float64, requires_grad=True)
    cache_k, cache_v = (torch.randn(s, b, groups, dim, generator=g, dtype=torch.float64) for _ in range(2))
    earlier = [(torch.randn(s, b, groups, dim, generator=g, dtype=torch.float64),) * 2]
    own_k = torch.randn(s, b, groups, dim, generator=g, dtype=torch.float64, requires_grad=True)
    own_v = torch.randn(s, b, groups, dim, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(s, s, dtype=torch.bool).triu(1)[None, None]
    out = drafter_attention(q, cache_k, cache_v, [earlier[0][0], own_k], [earlier[0][1], own_v], mask, scale)
    upstream = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((out * upstream).sum(), (q, own_k, own_v))

    rep = heads // groups
    want = torch.zeros(s, b, heads, dim, dtype=torch.float64)
    for i in range(s):
        for row in range(b):
            keys = torch.cat([cache_k[: i + 1, row], earlier[0][0][i:i + 1, row], own_k[i:i + 1, row]])
            vals = torch.cat([cache_v[: i + 1, row], earlier[0][1][i:i + 1, row], own_v[i:i + 1, row]])
            keys, vals = keys.repeat_interleave(rep, dim=1), vals.repeat_interleave(rep, dim=1)
            probs = (torch.einsum("hd,nhd->hn", q[i, row], keys) * scale).softmax(-1)
            want[i, row] = torch.einsum("hn,nhd->hd", probs, vals)
    want = want.reshape(s, b, heads * dim)
    assert (out - want).abs().max().item() <= 1e-12
    want_grads = torch.autograd.grad((want * upstream).sum(), (q, own_k, own_v))
    for got, ref in zip(grads, want_grads):
        assert (got - ref).abs().max().item() <= 1e-12
