# The two commands of the README: `make demo` (main job, built-in model) and `make test`.
VENV := .venv
PY := $(VENV)/bin/python
DEMO_OUT ?= outputs/demo

.PHONY: setup demo test lint clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m depthvlm_ros predict depthvlm_ros/data/sample_room.png \
		--camera-info depthvlm_ros/data/sample_room.yaml --out $(DEMO_OUT)

test: setup
	$(PY) -m ruff check depthvlm_ros test
	$(PY) -m pytest

lint: setup
	$(PY) -m ruff check depthvlm_ros test

clean:
	rm -rf outputs build *.egg-info .pytest_cache
