"""Rollout throughput and draft acceptance of a checkpoint, without drafting and with k MTP drafts.

    PYTHONPATH=. .venv/bin/python scripts/bench_rollout.py --model DIR \
        [--num-prompts 64 --max-tokens 128 --k 0,1,2,3 --temperature 1.0 --repeats 3]

For each k a fresh ``RolloutEngineGroup`` (one engine unless --num-engines) starts on the
checkpoint, runs one warm-up batch, then ``--repeats`` timed batches of ``--num-prompts`` prompts
inside a metrics window (``vllm/bench/...``). Prompts are "sort <digits> :" texts encoded with the
checkpoint's tokenizer; ``ignore_eos`` makes every run produce exactly num_prompts x max_tokens
tokens, so runs with different k generate the same amount of text. Prints one JSON object:
per k, tokens/s (from the median repeat), wall times, acceptance rate, mean acceptance length and
per-position acceptance (summed over all repeats), and the speed relative to k=0.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_prompts(model_dir: str, num_prompts: int, seed: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rng = random.Random(seed)
    digits = [" ".join(str(rng.randint(0, 9)) for _ in range(rng.randint(4, 12))) for _ in range(num_prompts)]
    texts = [f"sort {d} :" for d in digits]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def bench_one(args: argparse.Namespace, k: int, prompts: list[list[int]]) -> dict:
    from skyrl_mtp.inference.config import RolloutConfig, SamplingConfig
    from skyrl_mtp.inference.group import RolloutEngineGroup
    from skyrl_mtp.models.checkpoint import load_hf_state_dict

    config = RolloutConfig(
        model_path=args.model, num_engines=args.num_engines, num_speculative_tokens=k or None,
        max_model_len=args.max_model_len, dtype=args.dtype, seed=args.seed,
        kv_cache_memory_bytes=args.kv_cache_mb << 20 if args.kv_cache_mb else None,
        tensor_parallel_size=args.tensor_parallel_size,
    )
    sampling = SamplingConfig(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                              ignore_eos=True, logprobs=not args.no_logprobs, seed=args.seed)
    start = time.perf_counter()
    group = RolloutEngineGroup(config)
    startup = time.perf_counter() - start
    try:
        dtype = group.infos[0].dtype
        # One full weight sync (target + drafter) of the checkpoint's own tensors, as every RL step does.
        sync = group.sync_weights(load_hf_state_dict(args.model))
        group.generate(prompts[: max(1, len(prompts) // 8)], sampling)  # warm-up: first-call costs
        walls, tokens = [], []
        group.metrics.start("bench")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = group.generate(prompts, sampling)
            walls.append(time.perf_counter() - t0)
            tokens.append(sum(len(s.token_ids) for samples in out for s in samples))
        m = group.metrics.stop("bench")
    finally:
        group.shutdown()
    median_wall = statistics.median(walls)
    p = "vllm/bench/"
    return {
        "k": k,
        "tokens_per_s": tokens[0] / median_wall,
        "wall_s_median": median_wall,
        "wall_s_min": min(walls),
        "wall_s_all": walls,
        "output_tokens_per_run": tokens[0],
        "window_tokens_per_s": m.get(f"{p}generation_tokens_per_s"),
        "acceptance_rate": m.get(f"{p}draft_acceptance_rate"),
        "mean_acceptance_length": m.get(f"{p}draft_mean_acceptance_length"),
        "acceptance_rate_per_pos": [m[f"{p}draft_acceptance_rate_pos_{i}"] for i in range(k)] if k else [],
        "num_drafts": m[f"{p}num_drafts"],
        "num_draft_tokens": m[f"{p}num_draft_tokens"],
        "num_accepted_tokens": m[f"{p}num_accepted_tokens"],
        "engine_startup_s": startup,
        "engine_dtype": dtype,
        "weight_sync_s": sync.total_s,
        "weight_sync_bytes": sync.nbytes,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="HF checkpoint directory (MiMo layout, with tokenizer)")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--k", default="0,1,2,3", help="comma-separated num_speculative_tokens values; 0 = no drafting")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-engines", type=int, default=1)
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--kv-cache-mb", type=int, default=256,
                        help="explicit KV cache size (0: vLLM's default sizing)")
    parser.add_argument("--no-logprobs", action="store_true", help="do not request sampled-token logprobs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ray-num-cpus", type=int, default=None)
    args = parser.parse_args(argv)
    ks = [int(x) for x in args.k.split(",") if x.strip()]
    if not ks or min(ks) < 0:
        parser.error(f"--k must list ints >= 0, got {args.k!r}")
    if not (Path(args.model) / "config.json").is_file():
        parser.error(f"--model {args.model}: no config.json there")

    import ray

    os.environ.pop("RAY_ADDRESS", None)  # a benchmark never attaches to someone else's cluster
    ray.init(address="local", num_cpus=args.ray_num_cpus or os.cpu_count(), include_dashboard=False,
             _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        prompts = make_prompts(args.model, args.num_prompts, args.seed)
        results = []
        for k in ks:
            results.append(bench_one(args, k, prompts))
            # One line per k on stderr: a run cut short (time limit) still leaves its finished k's.
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    finally:
        ray.shutdown()
    import vllm  # noqa: PLC0415 (version only; the engines ran in their own processes)

    base = next((r for r in results if r["k"] == 0), None)
    report = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.date.today().isoformat(),
        "machine": {"arch": platform.machine(), "cpus": os.cpu_count(), "vllm": vllm.__version__},
        "settings": {"num_prompts": args.num_prompts, "max_tokens": args.max_tokens, "temperature": args.temperature,
                     "top_p": args.top_p, "repeats": args.repeats, "num_engines": args.num_engines,
                     "logprobs": not args.no_logprobs, "dtype": args.dtype,
                     "mean_prompt_tokens": statistics.mean(len(p) for p in prompts)},
        "results": results,
        "speed_vs_no_drafting": ({str(r["k"]): r["tokens_per_s"] / base["tokens_per_s"] for r in results}
                                 if base else None),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
