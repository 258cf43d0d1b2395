"""How far does TF32 rounding of the Gated DeltaNet's inputs move the qwen3_5 tiny logits (the
test_megatron_matches_transformers comparison, tolerance 2e-4)? CPU emulation."""
import sys, torch
sys.path[:0] = ["tests/megatron", "tests"]  # the test module's helpers; run from the repository root
import megatron.core.ssm.gated_delta_net as gdn
import test_qwen3_5 as t
from skyrl_mtp.megatron.parallel import init_megatron, free_port
from skyrl_mtp.models.checkpoint import save_hf_checkpoint

def tf32(x):
    if x.dtype != torch.float32:
        return x
    i = x.contiguous().view(torch.int32)
    return ((i + 0x1000) & ~0x1FFF).view(torch.float32)

orig = gdn.torch_chunk_gated_delta_rule
def rounded(q, k, v, **kw):
    return orig(tf32(q), tf32(k), tf32(v), **kw)

init_megatron(rank=0, world_size=1, master_port=free_port())
import tempfile, pathlib
for seq in (14, 70):
    cfg = t.TINY.replace(init_std=0.1)
    hf = t._nontrivial(cfg, seed=11)
    ckpt = save_hf_checkpoint(cfg, hf, pathlib.Path(tempfile.mkdtemp()) / "q35")
    ids = torch.randint(4, cfg.vocab_size, (2, seq), generator=torch.Generator().manual_seed(seq))
    trunk, head = t._models(cfg, hf)
    want, want_mtp = t._hf_reference(ckpt, cfg, hf, ids)
    for name, fn in (("fp32", orig), ("tf32 q/k/v", rounded)):
        gdn.torch_chunk_gated_delta_rule = fn
        logits, mtp = t._megatron_logits(trunk, head, ids)
        print(seq, name, "trunk err %.2e" % (logits[..., :cfg.vocab_size] - want).abs().max().item(),
              "mtp err %.2e" % (mtp[:, :-1, :cfg.vocab_size] - want_mtp).abs().max().item(), flush=True)
    gdn.torch_chunk_gated_delta_rule = orig
