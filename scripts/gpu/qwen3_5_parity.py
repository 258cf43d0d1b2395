"""Where the qwen3_5 trunk's logits part from transformers' on the GPU, by Gated DeltaNet backend.

The GPU twin of ``tests/megatron/test_qwen3_5.py::test_megatron_matches_transformers`` (its weights,
ids and references), run once per backend in a fresh process and printed as JSON lines: the largest
logit error over positions before fla's 64-token chunk and from it on. Backends:
  fla        Megatron's GatedDeltaNet with fla's Triton kernels (what training uses on CUDA; here
             also under Triton < 3.7.1, whose fla backward this project refuses: only forward runs)
  fla_ieee   the same with TRITON_F32_DEFAULT=ieee (fp32 tl.dot without TF32 rounding)
  torch      this project's TorchGatedDeltaNet on CUDA (fla out of the picture)
    PYTHONPATH=/tmp/triton:/tmp/site:$PWD python3 scripts/gpu/qwen3_5_parity.py fla fla_ieee torch
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def measure(backend: str, seqs: list[int]) -> None:
    import tempfile

    import pytest
    import torch

    sys.path.insert(0, str(ROOT / "tests" / "megatron"))
    import test_qwen3_5 as t  # noqa: E402  (the test's own helpers: one definition of the comparison)

    from skyrl_mtp.megatron import qwen3_5
    from skyrl_mtp.megatron.parallel import destroy_megatron, free_port, init_megatron

    if backend == "torch":
        qwen3_5.gdn_module = lambda: qwen3_5.TorchGatedDeltaNet
    else:  # forward only: fla's backward refusal on Hopper with Triton < 3.7.1 does not apply
        qwen3_5.fla_backward_usable = lambda: True
    init_megatron(rank=0, world_size=1, master_port=free_port())
    with pytest.MonkeyPatch.context() as mp, tempfile.TemporaryDirectory() as tmp:
        t._use_torch_gated_delta_net(mp)
        cfg = t.TINY.replace(init_std=0.1)
        hf = t._nontrivial(cfg, seed=11)
        ckpt = t.save_hf_checkpoint(cfg, hf, Path(tmp) / "q35")
        for seq in seqs:
            ids = torch.randint(4, cfg.vocab_size, (2, seq), generator=torch.Generator().manual_seed(seq))
            trunk, head = t._models(cfg, hf)
            logits, mtp = t._megatron_logits(trunk, head, ids)
            want_logits, want_mtp = t._hf_reference(ckpt, cfg, hf, ids)
            err = t._per_position(logits[..., : cfg.vocab_size] - want_logits)
            err_mtp = t._per_position(mtp[:, :-1, : cfg.vocab_size] - want_mtp)
            print(json.dumps({
                "backend": backend, "seq": seq, "gdn": type(trunk.decoder.layers[0].self_attention).__name__,
                "max_err_before_64": round(err[:64].max().item(), 8),
                "max_err_from_64": round(err[64:].max().item(), 8) if seq > 64 else None,
                "mtp_max_err": round(err_mtp.max().item(), 8),
                "worst_position": int(err.argmax()), "max_abs_logit": round(want_logits.abs().max().item(), 4),
                "triton": _version("triton"), "fla": _version("fla"),
            }), flush=True)
    destroy_megatron()


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def main() -> None:
    if sys.argv[1:2] == ["--one"]:
        measure(sys.argv[2], [14, 70])
        return
    for backend in sys.argv[1:] or ["fla", "fla_ieee", "torch"]:
        env = {**os.environ, **({"TRITON_F32_DEFAULT": "ieee"} if backend == "fla_ieee" else {})}
        run = subprocess.run([sys.executable, __file__, "--one", backend], env=env, capture_output=True, text=True,
                             timeout=900)
        lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
        print("\n".join(lines) if lines else json.dumps({"backend": backend, "rc": run.returncode,
                                                          "stderr_tail": run.stderr[-1500:]}), flush=True)


if __name__ == "__main__":
    main()
