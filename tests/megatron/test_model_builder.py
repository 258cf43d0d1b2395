"""transformer_config picks fused kernels only where they can run."""

import importlib.util

import pytest
import torch

from skyrl_mtp.megatron.model_builder import BuildOptions, transformer_config
from skyrl_mtp.models.mimo import get_preset


@pytest.mark.parametrize("extension_installed", [False, True])
def test_masked_softmax_fusion_needs_the_compiled_extension(monkeypatch, extension_installed):
    # On a GPU whose megatron-core wheel lacks scaled_masked_softmax_cuda (the plain PyPI wheel),
    # the fused softmax would fail at the first padded batch (seen on an H100 with 0.19.2).
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: (
        (object() if extension_installed else None) if name == "scaled_masked_softmax_cuda" else real_find_spec(name, *a)))
    cfg = transformer_config(get_preset("tiny"), BuildOptions())
    assert cfg.masked_softmax_fusion is extension_installed
    assert cfg.bias_activation_fusion is True  # torch-jit fusions need no extension


def test_cpu_config_has_no_fusions():
    if torch.cuda.is_available():
        pytest.skip("checks the CPU choice")
    cfg = transformer_config(get_preset("tiny"), BuildOptions())
    assert not (cfg.masked_softmax_fusion or cfg.bias_activation_fusion or cfg.bias_dropout_fusion)
