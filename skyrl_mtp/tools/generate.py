"""Generate with vLLM from a mimo checkpoint, drafting with its MTP head; prints JSON.

    python -m skyrl_mtp.tools.generate --model DIR --prompt "sort 3142 :" [--k 2] [--max-tokens 16]
    python -m skyrl_mtp.tools.generate --model DIR --prompt-ids 1,5,9 --prompt-ids 1,7 --k 2

Greedy by default. The JSON holds each prompt's generated token ids and text, and the engine's
cumulative speculative-decoding counters (drafts, draft tokens, accepted tokens, per position).
"""

from __future__ import annotations

import argparse
import json
import os


def spec_decode_counters(llm) -> dict:
    """Cumulative spec-decode counters of an LLM created with disable_log_stats=False."""
    out = {"num_drafts": 0, "num_draft_tokens": 0, "num_accepted_tokens": 0, "accepted_per_pos": []}
    names = {"vllm:spec_decode_num_drafts": "num_drafts",
             "vllm:spec_decode_num_draft_tokens": "num_draft_tokens",
             "vllm:spec_decode_num_accepted_tokens": "num_accepted_tokens"}
    for metric in llm.get_metrics():
        if metric.name in names:
            out[names[metric.name]] += int(metric.value)
        elif metric.name == "vllm:spec_decode_num_accepted_tokens_per_pos":
            out["accepted_per_pos"] = [int(v) for v in metric.values]
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    parser.add_argument("--prompt-ids", action="append", default=[], help="comma-separated token ids (repeatable)")
    parser.add_argument("--k", type=int, default=2, help="num_speculative_tokens (0: no drafting)")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--memory-fraction", type=float, default=0.3,
                        help="vLLM gpu_memory_utilization (on CPU: fraction of one NUMA node's memory)")
    args = parser.parse_args(argv)
    if not args.prompt and not args.prompt_ids:
        parser.error("give at least one --prompt or --prompt-ids")
    if args.k < 0:
        parser.error(f"--k must be >= 0, got {args.k}")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import torch

    cuda_kwargs = {}
    if torch.cuda.is_available():  # the engines' CUDA settings (no FlashInfer in the verified wheel set)
        from skyrl_mtp.inference.engine import CUDA_ENGINE_DEFAULTS, cuda_llm_defaults

        for key, value in CUDA_ENGINE_DEFAULTS.items():
            os.environ.setdefault(key, value)
        cuda_kwargs = cuda_llm_defaults()
    from vllm import LLM, SamplingParams, TokensPrompt

    llm = LLM(model=args.model, dtype=args.dtype, max_model_len=args.max_model_len, seed=0,
              gpu_memory_utilization=args.memory_fraction, disable_log_stats=False, enforce_eager=True,
              speculative_config={"method": "mtp", "num_speculative_tokens": args.k} if args.k else None,
              **cuda_kwargs)
    prompts = list(args.prompt) + [TokensPrompt(prompt_token_ids=[int(t) for t in p.split(",")]) for p in args.prompt_ids]
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, ignore_eos=True, seed=0)
    results = llm.generate(prompts, params, use_tqdm=False)
    report = {
        "outputs": [{"token_ids": list(r.outputs[0].token_ids), "text": r.outputs[0].text} for r in results],
        "spec_decode": spec_decode_counters(llm),
    }
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
