"""Per-kernel CUDA time of row_topk (4,096 x 151,936 bf16, k = 64) under torch.profiler, and
segment_top's time by num_warps. Run from the repository root with PYTHONPATH=/tmp/site:$PWD."""
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from skyrl_mtp.mtp import topk as topk_module

rows, vocab, k = 4096, 151936, 64
generator = torch.Generator(device="cuda").manual_seed(0)
values = (torch.randn(rows, vocab, device="cuda", generator=generator) * 3).to(torch.bfloat16)
for per_seg in (1, 2):
    topk_module._PER_SEG = per_seg
    for _ in range(3):
        topk_module.row_topk(values, k)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            topk_module.row_topk(values, k)
        torch.cuda.synchronize()
    print(f"=== per_seg {per_seg} (5 calls)")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12), flush=True)

segment_top, collect = topk_module._kernels()
seg, n_seg = topk_module._segment_plan(vocab, k)
offers = torch.empty((rows, n_seg * 2), dtype=torch.float32, device="cuda")
for per_seg in (1, 2):
    for warps in (1, 2, 4, 8):
        def launch():
            segment_top[(rows, n_seg)](values, offers, vocab, values.stride(0), n_seg, SEG=seg, PER_SEG=per_seg,
                                       num_warps=warps)
        launch()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            launch()
        end.record()
        torch.cuda.synchronize()
        print(f"segment_top per_seg={per_seg} warps={warps}: {start.elapsed_time(end) / 20:.3f} ms", flush=True)
