"""Megatron on CPU: a real DDP + optimizer (with gradient clipping) step; the activation condition."""

from __future__ import annotations

import threading

import pytest
import torch

from skyrl_mtp.megatron import cpu_support
from skyrl_mtp.megatron.model_builder import build_trunk, causal_mask
from skyrl_mtp.models.mimo import get_preset


def test_training_step_changes_weights_and_lowers_loss(megatron_single):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    cfg = get_preset("tiny")
    trunk = build_trunk(cfg)
    ddp = DistributedDataParallel(trunk.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), trunk)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=3e-3, clip_grad=0.5, params_dtype=torch.float32), [ddp])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # also runs on GPU (docs/gpu.md)
    ids = torch.randint(4, 300, (4, 24), generator=torch.Generator().manual_seed(0)).to(device)
    pos = torch.arange(24, device=device)[None].expand(4, -1)
    before = {n: p.detach().clone() for n, p in trunk.named_parameters()}
    losses, norms = [], []
    for _ in range(4):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        loss = ddp(ids[:, :-1], pos[:, :-1], causal_mask(23, device=device), labels=ids[:, 1:]).mean()
        loss.backward()
        ddp.finish_grad_sync()
        ok, grad_norm, _ = opt.step()
        assert ok
        losses.append(loss.item())
        norms.append(grad_norm)
    assert losses[-1] < losses[0]
    # Clipping ran: the reported (pre-clip) norm is above the clip value, yet the update is bounded.
    assert norms[0] > 0.5
    changed = [n for n, p in trunk.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert len(changed) == len(before)


def test_active_only_without_cuda(monkeypatch):
    # The condition is exactly "no CUDA device".
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cpu_support.cpu_support_needed() is False
    result = {}

    def fresh_thread():  # a thread that never activated: activate() must leave it untouched
        result["activated"] = cpu_support.activate()
        result["active"] = cpu_support.is_active()

    t = threading.Thread(target=fresh_thread)
    t.start()
    t.join()
    assert result == {"activated": False, "active": False}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cpu_support.cpu_support_needed() is True


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU redirect itself")
def test_importing_the_package_does_not_activate():
    import subprocess
    import sys

    code = ("import skyrl_mtp, skyrl_mtp.megatron.model_builder, skyrl_mtp.megatron.bridge, torch;"
            "from skyrl_mtp.megatron import cpu_support;"
            "assert not cpu_support.is_active();"
            "assert torch.cuda.current_device.__module__ == 'torch.cuda', torch.cuda.current_device")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU redirect itself")
def test_redirect_maps_cuda_devices_to_cpu():
    import subprocess
    import sys

    # In a subprocess: activation patches process-wide torch.cuda functions.
    code = ("import torch; from skyrl_mtp.megatron import cpu_support; assert cpu_support.activate();"
            "print(torch.zeros(2, device='cuda').device.type, torch.ones(1).cuda().device.type,"
            " torch.tensor([1.0], device=torch.cuda.current_device()).device.type, torch.ones(1).type());"
            "cpu_support.deactivate(); print(torch.ones(1).type())")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()
    assert out == ["cpu", "cpu", "cpu", "torch.cuda.FloatTensor", "torch.FloatTensor"]
