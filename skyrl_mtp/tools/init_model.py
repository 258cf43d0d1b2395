"""Write a randomly initialised HF checkpoint (safetensors + config + tokenizer) of a model preset
(any family: tiny, small, qwen3_5_tiny, ...).

    python -m skyrl_mtp.tools.init_model --preset tiny --out DIR [--seed N]
"""

from __future__ import annotations

import argparse

from skyrl_mtp.models.checkpoint import random_hf_state_dict, save_hf_checkpoint
from skyrl_mtp.models.families import get_preset


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", required=True, help="model preset, e.g. tiny or qwen3_5_tiny")
    parser.add_argument("--out", required=True, help="output directory (replaced atomically)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)
    cfg = get_preset(args.preset)  # unknown preset fails here, before any tensor is made
    if cfg.tokenizer is None:
        parser.error(f"preset {cfg.name!r} has no built-in tokenizer; start from its released checkpoint instead")
    out = save_hf_checkpoint(cfg, random_hf_state_dict(cfg, args.seed), args.out, torch_dtype=args.dtype)
    print(f"wrote {out} (preset {cfg.name}, seed {args.seed})")


if __name__ == "__main__":
    main()
