# Entry points: `make demo` and `make test`. Both create .venv on first use and
# (re)install the package whenever setup.py changes.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# TensorFlow's C++ INFO/WARNING lines drown the output of short commands.
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: demo test benchmark benchmark-smoke

# The whole job on the bundled digits: train a teacher, compress 16x, recover,
# evaluate, export (runs/quickstart/; a rerun resumes or reuses that run).
demo: $(STAMP)
	$(PY) tools/train.py --flagfile=flags/quickstart.cfg

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests

# Writes benchmarks/results/compress_speed.{json,md} (a few minutes on 2 CPU cores).
benchmark: $(STAMP)
	$(PY) tools/benchmark.py --flagfile=flags/compress_speed.cfg

# The same suite on a small VGG16 (seconds), into a scratch directory.
benchmark-smoke: $(STAMP)
	$(PY) tools/benchmark.py --flagfile=flags/compress_speed.cfg --smoke \
		--output_dir=/tmp/micik_benchmark_smoke

$(PY):
	$(PYTHON) -m venv $(VENV)

# The stamp depends on setup.py so that a changed dependency list re-installs.
# The venv itself is order-only: its mtime changes on every install.
$(STAMP): setup.py | $(PY)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[test,demo,tfmot]"
	touch $@
