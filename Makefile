# The two commands of the README: `make demo` (main job, built-in model) and `make test`.
VENV := .venv
PY := $(VENV)/bin/python
DEMO_OUT ?= outputs/demo

.PHONY: setup demo test lint clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m depthvlm_ros demo --out $(DEMO_OUT)

test: setup
	$(PY) -m ruff check depthvlm_ros test
	$(PY) -m pytest

lint: setup
	$(PY) -m ruff check depthvlm_ros test

clean:
	rm -rf outputs build *.egg-info .pytest_cache
