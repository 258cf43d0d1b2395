# The two commands of the README. Each one sets up (or updates) .venv itself, idempotently.
PY := .venv/bin/python
ARGS ?=

.PHONY: setup train test

setup:
	@bash scripts/setup_env.sh

# The main job.
train: setup
	$(PY) -m skyrl_mtp.main $(ARGS)

# The whole test suite (CI runs exactly this through .ci/run).
test: setup
	$(PY) -m pytest -q tests $(ARGS)
