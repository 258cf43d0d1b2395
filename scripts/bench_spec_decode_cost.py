"""Cost of one speculative-decoding step vs a plain decode step in real vLLM; prints JSON.

    python scripts/bench_spec_decode_cost.py --preset mimo_7b --batches 1,8,32,64,128,256 --ks 0,1,2,3 \
        --repeats 3 --max-tokens 128 [--acceptance 0.88,0.65,0.45] [--out FILE]

For each k, one ``vllm.LLM`` starts on the preset's shapes with dummy (random) bf16 weights and the
model's own MTP layer as drafter (k=0: no drafting). Each batch size runs one warm-up and then
``--repeats`` timed generations of ``max_tokens`` new tokens per request (random 64-token prompts,
``ignore_eos``, greedy). c(k) = t_run(k) / t_run(0) at the same batch size is the step-cost ratio
the speedup model (``skyrl_mtp/inference/speedup.py``) divides by, exact when no draft is accepted
(every run then takes ``max_tokens`` steps). With random weights some requests' greedy outputs
repeat a token that the random MTP layer then predicts (on an H100 at MiMo-7B shapes: none at
batch 1, ~30% of tokens at batch >= 8); a batch still takes as many steps as its slowest request,
so c(k) is kept as the primary ratio and ``step_cost_ratio_if_uniform`` (every request skipping
the mean number of accepted steps) is reported as the other bound. ``--acceptance`` (per-position
rates measured by a training run) adds the predicted speedup table and the best k per batch size.

Needs a GPU and vLLM (docs/gpu.md). VLLM_ENABLE_V1_MULTIPROCESSING=0 is set here so the engine runs
in this process.
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
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def run_k(args, model_dir: str, k: int, prompts: list[list[int]]) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from skyrl_mtp.inference.metrics import counters_from_vllm_metrics

    start = time.perf_counter()
    llm = LLM(model=model_dir, load_format="dummy", dtype="bfloat16", skip_tokenizer_init=True,
              max_model_len=args.max_model_len, gpu_memory_utilization=args.gpu_memory_utilization,
              max_num_seqs=max(ints(args.batches)), seed=0, disable_log_stats=False,
              speculative_config={"method": "mtp", "num_speculative_tokens": k} if k else None)
    startup_s = time.perf_counter() - start
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True, detokenize=False)
    rows = {}
    for batch in ints(args.batches):
        batch_prompts = [TokensPrompt(prompt_token_ids=p) for p in prompts[:batch]]
        llm.generate(batch_prompts, params, use_tqdm=False)  # warm-up (and CUDA-graph shapes)
        times, accepted = [], []
        for _ in range(args.repeats):
            before = counters_from_vllm_metrics(llm.get_metrics())
            t0 = time.perf_counter()
            outputs = llm.generate(batch_prompts, params, use_tqdm=False)
            times.append(time.perf_counter() - t0)
            after = counters_from_vllm_metrics(llm.get_metrics())
            assert all(len(o.outputs[0].token_ids) == args.max_tokens for o in outputs)
            accepted.append((after.num_accepted_tokens - before.num_accepted_tokens) / batch)
        steps = args.max_tokens - statistics.mean(accepted)
        rows[batch] = {"wall_s": times, "median_s": statistics.median(times),
                       "accepted_per_request": statistics.mean(accepted),
                       "step_ms": 1000 * statistics.median(times) / steps}
    del llm
    import gc

    import torch

    gc.collect()
    torch.cuda.empty_cache()
    return {"startup_s": startup_s, "batches": rows}


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="mimo_7b")
    p.add_argument("--batches", default="1,8,32,64,128,256")
    p.add_argument("--ks", default="0,1,2,3")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    p.add_argument("--acceptance", default=None, help="per-position acceptance, e.g. 0.88,0.65,0.45")
    p.add_argument("--out", default=None, help="also write the JSON here (rewritten after each k)")
    p.add_argument("--baseline", default=None, help="take k=0 from this earlier report (--out file)")
    p.add_argument("--in-process", action="store_true", help="run every k in this process (default: one child per k)")
    args = p.parse_args()
    ks = ints(args.ks)
    if 0 not in ks and not args.in_process and not args.baseline:
        p.error(f"--ks {args.ks!r} must include 0: every cost is relative to the plain decode step")
    acceptance = [float(x) for x in args.acceptance.split(",")] if args.acceptance else None
    if acceptance is not None and max(ks) > len(acceptance):
        p.error(f"--acceptance has {len(acceptance)} positions but --ks goes up to {max(ks)}")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

    import torch
    import vllm

    from skyrl_mtp.inference.speedup import best_k, speedup_table, step_cost_ratios
    from skyrl_mtp.models.mimo import get_preset

    model_dir = tempfile.mkdtemp(prefix="bench_spec_cost_")
    Path(model_dir, "config.json").write_text(json.dumps(get_preset(args.preset).to_hf_config("bfloat16")))
    vocab = get_preset(args.preset).vocab_size
    rng = random.Random(0)
    prompts = [[rng.randrange(10, vocab) for _ in range(args.prompt_len)] for _ in range(max(ints(args.batches)))]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.machine()})"
    report = {"date": datetime.date.today().isoformat(), "device": device,
              "vllm": vllm.__version__, "preset": args.preset, "max_tokens": args.max_tokens,
              "prompt_len": args.prompt_len, "repeats": args.repeats, "per_k": {}}
    if args.baseline:  # k=0 from an earlier report of the same settings (saves one engine start)
        earlier = json.loads(Path(args.baseline).read_text())
        report["per_k"][0] = earlier["per_k"]["0"]
        ks = [k for k in ks if k != 0]
    for k in sorted(ks):
        if args.in_process:
            # Through JSON like the child reports, so batch keys are strings everywhere.
            report["per_k"][k] = json.loads(json.dumps(run_k(args, model_dir, k, prompts)))
        else:
            # One process per k: an in-process vLLM engine does not hand its GPU memory back on `del`.
            import subprocess

            part = Path(model_dir, f"k{k}.json")
            argv = [a for a in sys.argv[1:]]
            cmd = [sys.executable, __file__, *argv, "--ks", str(k), "--in-process", "--out", str(part)]
            subprocess.run(cmd, check=True)
            report["per_k"][k] = json.loads(part.read_text())["per_k"][str(k)]
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=1))
        print(json.dumps({"k": k, **report["per_k"][k]}), flush=True)
    if 0 not in report["per_k"] or len(report["per_k"]) < 2:  # e.g. a child run of one k: no ratio
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=1))
        return report
    ratios = step_cost_ratios(report["per_k"], "median_s")
    report["step_cost_ratio"] = ratios
    report["step_cost_ratio_if_uniform"] = step_cost_ratios(report["per_k"], "step_ms")
    if acceptance is not None:
        table = speedup_table(acceptance, ratios)
        report["acceptance_per_pos"] = acceptance
        report["predicted_speedup"] = table
        report["best_k"] = best_k(table)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
