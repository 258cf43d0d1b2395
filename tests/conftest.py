"""Shared fixtures: tiny checkpoints, a Megatron process group for in-process model tests, and the CPU
search task with its retrieval server."""

from __future__ import annotations

import os

import pytest

# Tests must never attach to a foreign Ray cluster or phone home.
os.environ.pop("RAY_ADDRESS", None)
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Bitwise comparisons on CUDA need deterministic kernels (cuBLAS reads this at handle creation).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
# fp32 against fp32 / fp64 references on CUDA: Triton's tl.dot takes TF32 for fp32 inputs unless
# told otherwise (fla's delta-rule kernels leave it at the default), 10-bit mantissas that a 2e-4
# comparison would measure instead of the code. Set before any kernel compiles; bf16 inputs are unaffected.
os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")


def pytest_report_header(config):
    """Which megatron-core the run tests (`make test` runs the Megatron-facing tests on two)."""
    from importlib.util import find_spec

    spec = find_spec("megatron.core")
    if spec is None:
        return "megatron-core: not installed"
    import megatron.core

    return f"megatron-core {megatron.core.__version__} ({spec.origin})"


def pytest_configure(config):
    import torch

    if torch.cuda.is_available():
        torch.use_deterministic_algorithms(True, warn_only=True)
        # cuDNN's convolutions (the Gated DeltaNet's causal conv without causal-conv1d) take TF32 by
        # default; fp32 comparisons want fp32 (see TRITON_F32_DEFAULT above).
        torch.backends.cudnn.allow_tf32 = False


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A random tiny mimo checkpoint (untied, 1 MTP layer) written by the project's own tool."""
    from skyrl_mtp.tools.init_model import main

    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    main(["--preset", "tiny", "--out", str(out), "--seed", "7"])
    return out


@pytest.fixture(scope="module")
def megatron_single():
    """Megatron initialised for one process (gloo on CPU); torn down after the module."""
    from skyrl_mtp.megatron import cpu_support
    from skyrl_mtp.megatron.parallel import destroy_megatron, free_port, init_megatron

    init_megatron(rank=0, world_size=1, master_port=free_port())
    yield
    destroy_megatron()
    cpu_support.deactivate()


@pytest.fixture(scope="module")
def task():
    """The CPU search task (``SearchTask()``: its corpus, facts and examples)."""
    from skyrl_mtp.data.search_task import SearchTask

    return SearchTask()


@pytest.fixture(scope="module")
def server(task):
    """A retrieval server on loopback over the search task's corpus; stopped after the module."""
    from skyrl_mtp.envs.retrieval import start_retrieval_server

    with start_retrieval_server(task.corpus()) as srv:
        yield srv
