"""Memory of the calling process for the ``memory/*`` metrics (docs/scale.md).

Host RSS everywhere; on CUDA also torch's allocated and reserved bytes (current, and the peak since
the last reset: the peak of the phase that just ended when the caller resets at each phase
boundary) and the memory in use on the device by every process (a colocated engine's share
included). GiB throughout.
"""

from __future__ import annotations

import os

import torch

_GIB = float(1 << 30)


def host_rss_bytes() -> int:
    """Resident set size of this process (Linux /proc: no extra dependency)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def process_memory(reset_peak: bool = False) -> dict[str, float]:
    out = {"rss_gb": host_rss_bytes() / _GIB}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        device = torch.cuda.current_device()
        free, total = torch.cuda.mem_get_info(device)
        out.update({
            "cuda_allocated_gb": torch.cuda.memory_allocated(device) / _GIB,
            "cuda_reserved_gb": torch.cuda.memory_reserved(device) / _GIB,
            "cuda_peak_allocated_gb": torch.cuda.max_memory_allocated(device) / _GIB,
            "device_used_gb": (total - free) / _GIB,
        })
        if reset_peak:
            torch.cuda.reset_peak_memory_stats(device)
    return out


def memory_metrics(phase: str, role: str, per_process: list[dict[str, float]]) -> dict[str, float]:
    """``memory/<phase>/<role>_<stat>``: the largest value over the role's processes (ranks or engines)."""
    out: dict[str, float] = {}
    for stats in per_process:
        for name, value in stats.items():
            key = f"memory/{phase}/{role}_{name}"
            out[key] = max(out.get(key, 0.0), float(value))
    return out
