# The two commands of the README. Each one sets up (or updates) .venv itself, idempotently.
PY := .venv/bin/python
ARGS ?=

.PHONY: setup train test

setup:
	@bash scripts/setup_env.sh

# The main job: the CPU demo (warm start + DAPO with MTP drafting), examples/train/spec_decode/tiny_cpu_dapo.sh.
train: setup
	PYTHON=$(PY) bash examples/train/spec_decode/tiny_cpu_dapo.sh $(ARGS)

# The whole test suite (CI runs exactly this through .ci/run).
test: setup
	$(PY) -m pytest -q tests $(ARGS)
