"""Run megatron-core on a CPU-only PyTorch (gloo), for CI, laptops and the CPU demo.

megatron-core assumes CUDA everywhere. This module makes GPTModel (+ MTP block), Megatron DDP
and the Megatron optimizer (gradient clipping included) run on CPU by changing exactly this:

1. Device redirect. A ``TorchFunctionMode`` rewrites every CUDA device argument (``"cuda"``,
   ``"cuda:N"``, ``torch.device("cuda")``, a bare device index) of torch calls into ``"cpu"``,
   turns ``Tensor.cuda()`` into a no-op and drops ``pin_memory=True``. This covers the ~175
   ``torch.cuda.current_device()`` call sites and the hard-coded ``device="cuda"`` tensors (the
   default causal mask, optimizer ``_scale``/``found_inf``, ``GlobalMemoryBuffer``, RoPE
   ``inv_freq``, clip-grad buffers) without editing or monkey-patching Megatron's modules.
2. ``torch.cuda`` runtime calls that have no CPU meaning become harmless: ``current_device``
   returns 0 (which the redirect maps back to CPU), ``synchronize``/``empty_cache``/``set_device``
   do nothing, ``current_stream``/``Stream``/``Event`` return inert stand-ins, and the CUDA RNG
   state calls act on the CPU generator (Megatron's RNG tracker forks/restores it; activation
   recompute saves and restores it around each recomputed layer).
3. ``clip_grad_by_total_norm_fp32`` asserts ``torch.cuda.FloatTensor`` grads: the redirect makes
   ``Tensor.type()`` report the CUDA type name for CPU float tensors, so the assert holds for the
   same tensors it holds for on GPU.

It activates only through :func:`activate`, only when ``torch.cuda.is_available()`` is False,
and never as a side effect of importing ``skyrl_mtp``. Where CUDA exists it does nothing.
Keep dropout at 0, fusions off and sequence parallel off on CPU (see ``models`` presets).
"""

from __future__ import annotations

import threading

import torch
from torch.overrides import TorchFunctionMode

_state = threading.local()
_patched = False


def cpu_support_needed() -> bool:
    """The activation condition: no usable CUDA device in this process."""
    return not torch.cuda.is_available()


def _to_cpu_device(device):
    """Map a CUDA device spec to "cpu"; leave everything else unchanged."""
    if isinstance(device, torch.device):
        return torch.device("cpu") if device.type == "cuda" else device
    if isinstance(device, str):
        return "cpu" if device.startswith("cuda") else device
    if isinstance(device, int) and not isinstance(device, bool):
        return "cpu"  # a bare index means cuda:<index> to torch
    return device


_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments of torch calls to CPU (see module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CUDA_TYPE_NAMES.get(name, name)
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to and len(args) > 1:
            args = (args[0], _to_cpu_device(args[1]), *args[2:])
        return func(*args, **kwargs)


class _InertStream:
    """Stand-in for torch.cuda.Stream / Event on CPU: every method is a no-op."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return lambda *args, **kwargs: None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_RUNTIME_NAMES = ("current_device", "set_device", "synchronize", "empty_cache", "current_stream",
                  "default_stream", "stream", "Stream", "Event", "get_rng_state", "set_rng_state",
                  "manual_seed", "manual_seed_all")
_originals: dict[str, object] = {}


def _patch_torch_cuda_runtime() -> None:
    """Give the torch.cuda runtime calls Megatron makes a CPU meaning (idempotent)."""
    global _patched
    if _patched:
        return
    cuda = torch.cuda
    _originals.update({name: getattr(cuda, name) for name in _RUNTIME_NAMES})
    cuda.current_device = lambda: 0
    cuda.set_device = lambda *a, **k: None
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda: None
    cuda.current_stream = lambda *a, **k: _InertStream()
    cuda.default_stream = lambda *a, **k: _InertStream()
    cuda.stream = lambda *a, **k: _InertStream()
    cuda.Stream = _InertStream
    cuda.Event = _InertStream
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    # Activation recompute (tensor_parallel.checkpoint) reads the state through the submodule.
    # Its restore goes through torch.cuda._lazy_call, which without CUDA only queues the call:
    # harmless, because Megatron restores the CPU generator (the same state) with torch.set_rng_state.
    _originals["random.get_rng_state"] = torch.cuda.random.get_rng_state
    torch.cuda.random.get_rng_state = lambda *a, **k: torch.get_rng_state()
    # torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the CPU generator directly.
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = lambda seed: None
    _patched = True


def activate() -> bool:
    """Turn CPU support on in the calling thread if (and only if) there is no CUDA device.

    Returns True when active. Safe to call repeatedly and from several threads: each thread
    that runs Megatron code must call it once (Ray may run actor methods on other threads).
    """
    if not cpu_support_needed():
        return False
    _patch_torch_cuda_runtime()
    if getattr(_state, "mode", None) is None:
        mode = _CudaToCpuMode()
        mode.__enter__()
        _state.mode = mode
    return True


def deactivate() -> None:
    """Undo :func:`activate` in the calling thread and restore torch.cuda (used by tests)."""
    global _patched
    mode = getattr(_state, "mode", None)
    if mode is not None:
        mode.__exit__(None, None, None)
        _state.mode = None
    if _patched:
        for name, fn in _originals.items():
            module, attr = (torch.cuda.random, name.split(".", 1)[1]) if "." in name else (torch.cuda, name)
            setattr(module, attr, fn)
        _patched = False


def is_active() -> bool:
    """Whether the device redirect is active in the calling thread."""
    return getattr(_state, "mode", None) is not None
