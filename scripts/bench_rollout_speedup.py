"""Rollout speed of an RL-shaped batch with and without MTP drafting in real vLLM; JSON lines + a final JSON.

    python scripts/bench_rollout_speedup.py --preset mimo_7b --batches 512,128,32 --samples 8 --ks 0,1,2,3,4 \
        --profile skyrl=0.886,0.770,0.663,0.571 --profile project=0.723,0.499,0.234,0.1 \
        [--variants default,tuned] [--schedule 1-16:3,17-64:2,65-1024:1] [--out results.jsonl]

What RL waits for is the *whole batch*: prompts x samples requests whose response lengths are long
tailed (a few run to the length cap while most stop early), so the batch runs at full concurrency
for a while and then at a dwindling one. Each batch here is ``batch/samples`` random prompts of
``--prompt-len`` tokens, each repeated ``samples`` times, and every request gets its own
``max_tokens`` with ``ignore_eos`` (lengths drawn from a lognormal: ``--median``, ``--sigma``, capped
at ``--cap``; or ``--lengths-from metrics.jsonl``: the lognormal's mean set to a run's
``response/length_mean``). The same lengths are used for every k, so each k generates exactly the
same tokens' worth of work. Reported per batch: wall time of the whole batch, tokens/s, the
per-position acceptance vLLM counted, mean acceptance length, engine steps and the CUDA-graph mode
of every target and drafter forward (how many ran as FULL / PIECEWISE graphs or eagerly).

Acceptance: by default the engines run with dummy weights at the preset's shapes and vLLM's
*synthetic* rejection sampler (``speculative_config`` keys ``rejection_sample_method="synthetic"``,
``synthetic_acceptance_rates=[a_1..a_k]``: the unconditional per-position rates, the same numbers
vLLM reports as acceptance per position), so a profile measured elsewhere (a training run, a paper)
is replayed exactly; each ``--profile`` is cut to its first k rates. The drafter still runs its k
real forwards, so the cost of drafting is real. ``--model DIR`` instead loads a real checkpoint
(its trained MTP head) and measures the acceptance it gets (standard rejection sampling).

``--variants``: engine settings per k. ``default`` = what the project passes today (vLLM's
defaults); ``tuned`` = ``skyrl_mtp.inference.spec_tuning.engine_kwargs_for_drafting(k, max batch)``;
``schedule`` = vLLM's ``num_speculative_tokens_per_batch_size`` (``--schedule``; k is the largest k
in the schedule); ``custom`` = ``--engine-kwargs`` JSON. One engine per (k, variant), each in its
own process (an in-process vLLM engine keeps its GPU memory after ``del``); all profiles run in the
same engine (the synthetic rates are rewritten in place between profiles). Every finished batch
prints one JSON line at once (stdout, and ``--out`` if given), so a run cut by a time limit keeps
what it finished; the last line is the summary (speedup vs k=0 per batch and profile).

Needs a GPU and vLLM (docs/gpu.md); VLLM_ENABLE_V1_MULTIPROCESSING=0 keeps the engine in this process
(needed for the in-place rate switch and the CUDA-graph tallies).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


# ----------------------------------------------------------------------------------------------
# The batch (pure functions, no vLLM)
# ----------------------------------------------------------------------------------------------

def lognormal_lengths(n: int, median: float, sigma: float, cap: int, min_len: int, seed: int) -> list[int]:
    """n response lengths ~ round(lognormal(ln median, sigma)), clipped to [min_len, cap]."""
    rng = random.Random(seed)
    return [max(min_len, min(cap, int(round(math.exp(rng.gauss(math.log(median), sigma)))))) for _ in range(n)]


def mean_length_from_metrics(path: str, last_steps: int) -> float:
    """Mean of ``response/length_mean`` over the last ``last_steps`` steps of a run's metrics.jsonl."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    values = [r["response/length_mean"] for r in rows if "response/length_mean" in r]
    if not values:
        raise ValueError(f"{path}: no response/length_mean in any row")
    tail = values[-last_steps:]
    return sum(tail) / len(tail)


def acceptance_from_metrics(path: str, last_steps: int) -> list[float]:
    """Per-position acceptance (``vllm/draft_acceptance_rate_pos_i``), mean of the last steps."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "vllm/draft_acceptance_rate_pos_0" in r][-last_steps:]
    if not rows:
        raise ValueError(f"{path}: no vllm/draft_acceptance_rate_pos_0 in any row")
    k = 0
    while all(f"vllm/draft_acceptance_rate_pos_{k}" in r for r in rows):
        k += 1
    return [sum(r[f"vllm/draft_acceptance_rate_pos_{i}"] for r in rows) / len(rows) for i in range(k)]


def parse_profile(text: str) -> tuple[str, list[float]]:
    """'name=a1,a2,...' -> (name, [a1, a2, ...]); rates in [0, 1], non-increasing (vLLM's rule)."""
    name, sep, rates_text = text.partition("=")
    if not sep or not name:
        raise ValueError(f"--profile wants NAME=a1,a2,...; got {text!r}")
    rates = [float(x) for x in rates_text.split(",") if x.strip()]
    if not rates or any(not 0.0 <= a <= 1.0 for a in rates) or any(b > a for a, b in zip(rates, rates[1:])):
        raise ValueError(f"--profile {name}: rates must lie in [0, 1] and not increase: {rates}")
    return name, rates


def parse_schedule(text: str) -> list[list[int]]:
    """'1-16:3,17-64:2,65-1024:1' -> [[1, 16, 3], [17, 64, 2], [65, 1024, 1]] (vLLM's format)."""
    out = []
    for part in text.split(","):
        rng, _, k = part.partition(":")
        lo, _, hi = rng.partition("-")
        out.append([int(lo), int(hi), int(k)])
    return out


def make_batch(batch: int, samples: int, prompt_len: int, vocab: int, seed: int) -> list[list[int]]:
    """batch/samples random prompts, each repeated `samples` times (the GRPO group)."""
    if batch % samples:
        raise ValueError(f"batch {batch} is not a multiple of --samples {samples}")
    rng = random.Random(seed)
    prompts = [[rng.randrange(10, vocab) for _ in range(prompt_len)] for _ in range(batch // samples)]
    return [p for p in prompts for _ in range(samples)]


# ----------------------------------------------------------------------------------------------
# One engine (child process)
# ----------------------------------------------------------------------------------------------

def _runner(llm):
    """The GPUModelRunner of an in-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0)."""
    return llm.collective_rpc(lambda w: getattr(w, "worker", w).model_runner)[0]


class DispatchTally:
    """Counts the CUDA-graph mode vLLM's dispatcher picks for every forward (target and drafter)."""

    def __init__(self, dispatcher):
        self.counts: collections.Counter = collections.Counter()
        self.tokens: collections.Counter = collections.Counter()
        original = dispatcher.dispatch

        def dispatch(num_tokens, *args, **kwargs):
            mode, desc = original(num_tokens, *args, **kwargs)
            key = f"{mode.name}{'_uniform' if kwargs.get('uniform_decode') else ''}"
            self.counts[key] += 1
            self.tokens[key] += int(num_tokens)
            return mode, desc

        dispatcher.dispatch = dispatch

    def take(self) -> dict:
        out = {"calls": dict(self.counts), "tokens": dict(self.tokens)}
        self.counts.clear()
        self.tokens.clear()
        return out


def set_synthetic_rates(llm, rates: list[float]) -> None:
    """Rewrites the synthetic rejection sampler's per-position rates in place (same k)."""
    import torch
    from vllm.v1.spec_decode.utils import unconditional_to_conditional_rates

    sampler = _runner(llm).rejection_sampler
    current = sampler.synthetic_conditional_rates
    if current is None or current.numel() != len(rates):
        raise RuntimeError(f"engine has no synthetic sampler for {len(rates)} positions")
    current.copy_(torch.tensor(unconditional_to_conditional_rates(list(rates)), dtype=current.dtype))


def engine_config_summary(llm) -> dict:
    cfg = llm.llm_engine.vllm_config
    cc = cfg.compilation_config
    sizes = list(cc.cudagraph_capture_sizes or [])
    return {"cudagraph_mode": str(cc.cudagraph_mode), "max_cudagraph_capture_size": cc.max_cudagraph_capture_size,
            "num_capture_sizes": len(sizes), "capture_sizes_head": sizes[:8], "capture_sizes_tail": sizes[-4:],
            "max_num_seqs": cfg.scheduler_config.max_num_seqs,
            "max_num_batched_tokens": cfg.scheduler_config.max_num_batched_tokens,
            "async_scheduling": getattr(cfg.scheduler_config, "async_scheduling", None),
            "enable_prefix_caching": cfg.cache_config.enable_prefix_caching}


def run_engine(spec: dict, emit) -> None:
    """Starts one engine for spec['k'] / spec['variant'], runs every profile x batch, emits one
    dict per finished batch."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from skyrl_mtp.inference.metrics import counters_from_vllm_metrics

    k, variant, profiles = spec["k"], spec["variant"], spec["profiles"]
    synthetic = spec["synthetic"] and k > 0
    kwargs = dict(model=spec["model_dir"], dtype="bfloat16", seed=0, disable_log_stats=False,
                  max_model_len=spec["max_model_len"], gpu_memory_utilization=spec["gpu_memory_utilization"])
    if spec["dummy"]:
        kwargs.update(load_format="dummy", skip_tokenizer_init=True)
    kwargs.update(spec["engine_kwargs"])
    if k:
        sc = {"method": "mtp", "num_speculative_tokens": k, **spec.get("speculative_extra", {})}
        if synthetic:
            sc.update(rejection_sample_method="synthetic", synthetic_acceptance_rates=profiles[0][1][:k])
        kwargs["speculative_config"] = sc
    spec_config_sent = json.loads(json.dumps(kwargs.get("speculative_config")))  # vLLM adds objects to the dict
    start = time.perf_counter()
    llm = LLM(**kwargs)
    startup_s = time.perf_counter() - start
    runner = _runner(llm)
    target_tally = DispatchTally(runner.cudagraph_dispatcher)
    drafter = getattr(runner, "drafter", None)
    drafter_tally = DispatchTally(drafter.cudagraph_dispatcher) if k and hasattr(drafter, "cudagraph_dispatcher") else None
    summary = engine_config_summary(llm)
    emit({"event": "engine", "k": k, "variant": variant, "startup_s": startup_s, "engine_kwargs": spec["engine_kwargs"],
          "speculative_config": spec_config_sent, **summary})

    phase_s = collections.Counter()
    if spec.get("time_phases") and k:
        import torch

        original = drafter.propose
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

        def timed_propose(*a, **kw):
            sync()
            t = time.perf_counter()
            out = original(*a, **kw)
            sync()
            phase_s["propose_s"] += time.perf_counter() - t
            return out

        drafter.propose = timed_propose

    # Warm-up: first-call costs (Triton JIT of the sampler kernels, logprob graphs) outside the timing.
    warm = make_batch(min(64, max(spec["batches"])), 1, spec["prompt_len"], spec["vocab"], seed=99)
    llm.generate([TokensPrompt(prompt_token_ids=p) for p in warm],
                 SamplingParams(max_tokens=32, ignore_eos=True, temperature=spec["temperature"],
                                logprobs=spec["logprobs"], detokenize=False), use_tqdm=False)
    target_tally.take()
    if drafter_tally:
        drafter_tally.take()

    for profile_name, rates in (profiles if k else [("none", [])]):
        if synthetic:
            set_synthetic_rates(llm, rates[:k])
        for batch in spec["batches"]:
            prompts = spec["batch_prompts"][str(batch)]
            lengths = spec["batch_lengths"][str(batch)]
            params = [SamplingParams(max_tokens=n, ignore_eos=True, temperature=spec["temperature"],
                                     logprobs=spec["logprobs"], detokenize=False) for n in lengths]
            phase_s.clear()
            before = counters_from_vllm_metrics(llm.get_metrics())
            t0 = time.perf_counter()
            outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
            wall = time.perf_counter() - t0
            delta = counters_from_vllm_metrics(llm.get_metrics()) - before
            got = [len(o.outputs[0].token_ids) for o in outputs]
            if got != lengths:
                raise RuntimeError(f"k={k} batch={batch}: generated lengths differ from the requested ones")
            tokens = sum(got)
            drafts = delta.num_drafts
            row = {"event": "batch", "k": k, "variant": variant, "profile": profile_name,
                   "rates_set": rates[:k] if synthetic else None, "batch": batch,
                   "wall_s": wall, "output_tokens": tokens, "tokens_per_s": tokens / wall,
                   "max_len": max(lengths), "mean_len": tokens / len(lengths),
                   "acceptance_per_pos": [a / drafts for a in delta.accepted_per_pos] if drafts else [],
                   "acceptance_rate": delta.num_accepted_tokens / delta.num_draft_tokens if delta.num_draft_tokens else None,
                   "mean_acceptance_length": 1 + delta.num_accepted_tokens / drafts if drafts else 1.0,
                   "num_drafts": drafts, "num_accepted_tokens": delta.num_accepted_tokens,
                   "target_dispatch": target_tally.take(),
                   "drafter_dispatch": drafter_tally.take() if drafter_tally else None}
            steps = sum(row["target_dispatch"]["calls"].values())
            row["target_forwards"] = steps
            row["ms_per_target_forward"] = 1000 * wall / steps if steps else None
            if phase_s:
                row["phases"] = dict(phase_s)
            emit(row)


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------

def engine_kwargs_for(variant: str, k: int, args, max_batch: int) -> tuple[dict, dict]:
    """(LLM kwargs, extra speculative_config keys) of one variant."""
    if variant == "default":
        return {}, {}
    if variant == "tuned":
        from skyrl_mtp.inference.spec_tuning import engine_kwargs_for_drafting

        return engine_kwargs_for_drafting(k, max_batch), {}
    if variant == "maxseqs":  # only max_num_seqs = the batch (separates its effect from the graph sizes)
        return {"max_num_seqs": max_batch}, {}
    if variant == "schedule":
        return {}, {"num_speculative_tokens_per_batch_size": parse_schedule(args.schedule)}
    if variant == "custom":
        return json.loads(args.engine_kwargs), {}
    raise ValueError(f"unknown variant {variant!r}")


def summarize(rows: list[dict]) -> dict:
    """Per (k, variant, profile, batch) row: speedup = mean k=0 wall time at that batch (all k=0 runs
    in ``rows``) / this wall time, and step_cost = this run's ms per target forward / k=0's (the
    effective c(k) of an RL-shaped batch)."""
    import statistics

    batch_rows = [r for r in rows if r.get("event") == "batch"]
    base_wall, base_ms = collections.defaultdict(list), collections.defaultdict(list)
    for r in batch_rows:
        if r["k"] == 0:
            base_wall[r["batch"]].append(r["wall_s"])
            base_ms[r["batch"]].append(r["ms_per_target_forward"])
    table = []
    for r in batch_rows:
        if r["batch"] not in base_wall:
            continue
        table.append({"k": r["k"], "variant": r["variant"], "profile": r["profile"], "batch": r["batch"],
                      "wall_s": round(r["wall_s"], 3),
                      "speedup": round(statistics.mean(base_wall[r["batch"]]) / r["wall_s"], 3),
                      "step_cost": round(r["ms_per_target_forward"] / statistics.mean(base_ms[r["batch"]]), 3),
                      "tokens_per_s": round(r["tokens_per_s"], 1),
                      "acceptance_per_pos": [round(a, 3) for a in r["acceptance_per_pos"]],
                      "mean_acceptance_length": round(r["mean_acceptance_length"], 3),
                      "target_forwards": r.get("target_forwards"),
                      "target_graph_calls": r.get("target_dispatch", {}).get("calls")})
    return {"event": "summary", "speedup_vs_k0": table}


def markdown_tables(table: list[dict]) -> str:
    """One markdown table per profile: rows (k, variant), columns batch; cells 'speedup (c)', several
    runs of one cell joined by ' / '."""
    out = []
    batches = sorted({t["batch"] for t in table})
    profiles = [p for p in dict.fromkeys(t["profile"] for t in table) if p != "none"]
    for prof in profiles:
        keys = sorted({(t["k"], t["variant"]) for t in table if t["profile"] == prof})
        out += [f"**{prof}**", "", "| k | settings | " + " | ".join(f"batch {b}" for b in batches) + " |",
                "|---|---|" + "---|" * len(batches)]
        for k, variant in keys:
            cells = []
            for b in batches:
                runs = [t for t in table if (t["k"], t["variant"], t["profile"], t["batch"]) == (k, variant, prof, b)]
                cells.append(" / ".join(f"{t['speedup']:.2f}x ({t['step_cost']:.2f})" for t in runs) or "")
            out.append(f"| {k} | {variant} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="mimo_7b", help="model shapes (skyrl_mtp.models.mimo presets), dummy weights")
    p.add_argument("--model", default=None, help="a real HF checkpoint (MiMo layout): its trained head, real acceptance")
    p.add_argument("--batches", default="512,128,32", help="requests per batch (prompts x samples)")
    p.add_argument("--samples", type=int, default=8, help="samples per prompt (GRPO group size)")
    p.add_argument("--ks", default="0,1,2,3,4")
    p.add_argument("--variants", default="default", help="comma list of default, tuned, maxseqs, schedule, custom")
    p.add_argument("--profile", action="append", default=[], help="NAME=a1,a2,... per-position acceptance (synthetic)")
    p.add_argument("--profile-from", default=None, help="metrics.jsonl: its vllm/draft_acceptance_rate_pos_i as a profile")
    p.add_argument("--median", type=float, default=400.0)
    p.add_argument("--sigma", type=float, default=0.8)
    p.add_argument("--cap", type=int, default=2048)
    p.add_argument("--min-len", type=int, default=16)
    p.add_argument("--lengths-from", default=None, help="metrics.jsonl: lognormal mean = its response/length_mean")
    p.add_argument("--last-steps", type=int, default=5, help="steps of --lengths-from / --profile-from to average")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--logprobs", type=int, default=0, help="vLLM logprobs (0: the sampled token's, as RL uses); -1: none")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--schedule", default="1-16:3,17-64:2,65-1024:1", help="for --variants schedule")
    p.add_argument("--engine-kwargs", default="{}", help="JSON, for --variants custom")
    p.add_argument("--time-phases", action="store_true", help="also time drafter.propose (synchronizes: slower)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="append every JSON line here too")
    p.add_argument("--summarize", default=None, help="only print the summary table of an earlier --out file")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.summarize:
        rows = [json.loads(x) for x in Path(args.summarize).read_text().splitlines() if x.startswith("{")]
        for r in rows:
            if r.get("event") == "engine":
                print(f"engine k={r['k']} {r['variant']}: start {r['startup_s']:.0f} s, {r['cudagraph_mode']}, "
                      f"max graph {r['max_cudagraph_capture_size']} tokens, max_num_seqs {r['max_num_seqs']}")
            elif r.get("event") == "engine_failed":
                print(f"engine k={r['k']} {r['variant']} FAILED rc={r['returncode']}")
        table = summarize(rows)["speedup_vs_k0"]
        for t in table:
            print(" ".join(f"{key}={val}" for key, val in t.items()))
        print(markdown_tables(table))
        return None
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

    def emit(obj: dict) -> None:
        line = json.dumps(obj)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")

    if args.child:  # one engine, spec from the parent
        run_engine(json.loads(Path(args.child).read_text()), emit)
        return None

    ks = [int(x) for x in args.ks.split(",") if x.strip()]
    batches = [int(x) for x in args.batches.split(",") if x.strip()]
    variants = [v for v in args.variants.split(",") if v]
    profiles = [parse_profile(t) for t in args.profile]
    if args.profile_from:
        profiles.append(("metrics", acceptance_from_metrics(args.profile_from, args.last_steps)))
    synthetic = args.model is None
    if synthetic and max(ks) > 0:
        if not profiles:
            p.error("synthetic acceptance needs at least one --profile (or --profile-from)")
        short = [n for n, r in profiles if len(r) < max(ks)]
        if short:
            p.error(f"--profile {short} have fewer positions than k={max(ks)}; extend them")
    if not profiles:
        profiles = [("real", [])]

    median = args.median
    if args.lengths_from:
        median = mean_length_from_metrics(args.lengths_from, args.last_steps) / math.exp(args.sigma ** 2 / 2)

    if synthetic:
        from skyrl_mtp.models.mimo import get_preset

        preset = get_preset(args.preset)
        model_dir = tempfile.mkdtemp(prefix="bench_rollout_speedup_")
        Path(model_dir, "config.json").write_text(json.dumps(preset.to_hf_config("bfloat16")))
        vocab = preset.vocab_size
    else:
        model_dir = args.model
        vocab = json.loads(Path(model_dir, "config.json").read_text())["vocab_size"]
    batch_prompts = {str(b): make_batch(b, args.samples, args.prompt_len, vocab, args.seed + b) for b in batches}
    batch_lengths = {str(b): lognormal_lengths(b, median, args.sigma, args.cap, args.min_len, args.seed + 7 * b)
                     for b in batches}
    header = {"event": "settings", "date": datetime.date.today().isoformat(),
              "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
              "preset": None if args.model else args.preset, "model": args.model, "synthetic": synthetic,
              "batches": batches, "samples": args.samples, "ks": ks, "variants": variants,
              "profiles": {n: r for n, r in profiles}, "lengths": {"median": median, "sigma": args.sigma,
              "cap": args.cap, "min": args.min_len, "from": args.lengths_from},
              "length_stats": {b: {"mean": sum(v) / len(v), "max": max(v), "at_cap": sum(x == args.cap for x in v)}
                               for b, v in batch_lengths.items()},
              "prompt_len": args.prompt_len, "temperature": args.temperature, "logprobs": args.logprobs}
    try:
        import torch
        import vllm

        header.update(device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                      vllm=vllm.__version__, torch=torch.__version__)
    except Exception as e:  # the driver itself needs neither
        header["import_error"] = repr(e)
    emit(header)

    rows: list[dict] = []
    max_model_len = args.prompt_len + args.cap + 64
    for k in ks:
        for variant in (variants if k else ["default"]):
            engine_kwargs, spec_extra = engine_kwargs_for(variant, k, args, max(batches))
            if variant == "schedule":
                k_engine = max(e[2] for e in spec_extra["num_speculative_tokens_per_batch_size"])
                if k_engine != k:
                    continue  # the schedule variant runs once, at its largest k
            spec = {"k": k, "variant": variant, "profiles": profiles, "synthetic": synthetic, "dummy": synthetic,
                    "model_dir": model_dir, "vocab": vocab, "max_model_len": max_model_len,
                    "gpu_memory_utilization": args.gpu_memory_utilization, "engine_kwargs": engine_kwargs,
                    "speculative_extra": spec_extra, "batches": batches, "batch_prompts": batch_prompts,
                    "batch_lengths": batch_lengths, "prompt_len": args.prompt_len,
                    "temperature": args.temperature, "logprobs": None if args.logprobs < 0 else args.logprobs,
                    "time_phases": args.time_phases}
            spec_path = Path(tempfile.mkdtemp(prefix="spec_")) / "spec.json"
            spec_path.write_text(json.dumps(spec))
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(spec_path)]
            if args.out:
                cmd += ["--out", args.out]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
            for line in proc.stdout:  # the child's JSON lines (already in --out); keep them for the summary
                print(line, end="", flush=True)
                if line.startswith("{"):
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        pass
            if proc.wait() != 0:
                emit({"event": "engine_failed", "k": k, "variant": variant, "returncode": proc.returncode})
    summary = summarize(rows)
    emit(summary)
    return summary


if __name__ == "__main__":
    main()
