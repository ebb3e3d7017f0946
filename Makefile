# The two commands of the README: `make demo` (main job, built-in model) and `make test`.
VENV := .venv
PY := $(VENV)/bin/python
DEMO_OUT ?= outputs/demo

.PHONY: setup demo test test-fast lint clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m depthvlm_ros demo --out $(DEMO_OUT)

# Python 3.10 (JetPack 6) is the oldest supported: ruff targets it, vermin checks syntax and stdlib.
LINT_PATHS := depthvlm_ros test scripts launch setup.py

# Two pytest-xdist workers, a test file each at a time (its module fixtures stay in one process; each worker
# has its own ROS domain IDs): about 12 minutes instead of 21 on 2 cores (docs/benchmarks.md).
test: lint
	$(PY) -m pytest -n 2 --dist loadfile
	bash scripts/test_min_versions.sh -q

# The tier that needs no DDS processes, no demo/training/Triton runs and no GPU (docs/testing.md).
test-fast: lint
	$(PY) -m pytest -m "not ros and not slow and not gpu"

lint: setup
	$(PY) -m ruff check depthvlm_ros test
	$(VENV)/bin/mypy
	$(VENV)/bin/vermin --target=3.10- --violations --no-tips --eval-annotations -q $(LINT_PATHS)

clean:
	rm -rf outputs build *.egg-info .pytest_cache
