# The two commands of the README. Each one sets up (or updates) .venv itself, idempotently.
PY := .venv/bin/python
ARGS ?=

.PHONY: setup train test

setup:
	@bash scripts/setup_env.sh

# The main job: the CPU demo (warm start + DAPO with MTP drafting), examples/train/spec_decode/tiny_cpu_dapo.sh.
train: setup
	PYTHON=$(PY) bash examples/train/spec_decode/tiny_cpu_dapo.sh $(ARGS)

# The Megatron-facing tests, run a second time against the GPU stack's megatron-core
# (requirements/gpu-megatron.txt), which setup unpacks into .venv/mcore_gpu.
MCORE_GPU_TESTS := tests/megatron tests/workers/test_scale_features.py tests/workers/test_qwen3_5_policy.py

# The whole test suite, then that second pass (CI runs exactly this through .ci/run).
test: setup
	$(PY) -m pytest -q tests $(ARGS)
	@PYTHONPATH=.venv/mcore_gpu $(PY) -W ignore -c "import megatron.core as m; print('second pass: megatron-core', m.__version__, 'from', m.__file__)"
	PYTHONPATH=.venv/mcore_gpu $(PY) -m pytest -q $(MCORE_GPU_TESTS) $(ARGS)
