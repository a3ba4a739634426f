# Entry points: `make demo` and `make test`. Both create .venv on first use and
# (re)install the package whenever setup.py changes.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# TensorFlow's C++ INFO/WARNING lines drown the output of short commands.
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: demo test test-all benchmark benchmark-smoke benchmark-data

# The whole job on the bundled digits: train a teacher, compress 16x, recover,
# evaluate, export (runs/quickstart/; a rerun resumes or reuses that run).
demo: $(STAMP)
	$(PY) tools/train.py --flagfile=flags/quickstart.cfg

# Two test processes: much of a test's time is single-threaded (TensorFlow's
# import in subprocesses, tracing), so two overlap well on 2 cores.
# `make test` leaves out the tests marked slow (a minute or more each, covered
# in part by faster ones) to stay well under 10 minutes; `make test-all` runs
# every test.
test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -n 2 -m "not slow" --durations=12 tests

test-all: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -n 2 tests

# The benchmark suites (benchmarks/, results in benchmarks/results/): the
# accuracy curve on Fashion-MNIST runs for hours, in the background, and
# resumes where it stopped; `benchmark-data` installs Fashion-MNIST's files.
benchmark-data:
	@test -d /usr/share/datasets/fashion-mnist || (apt-get update && apt-get install -y dataset-fashion-mnist) \
		|| echo "Install Fashion-MNIST yourself: apt-get install dataset-fashion-mnist, or tfds build fashion_mnist"

benchmark: $(STAMP) benchmark-data
	$(PY) tools/benchmark.py --suite=curve --workers=2
	$(PY) tools/benchmark.py --suite=vit_mha
	$(PY) tools/benchmark.py --suite=deploy_axes
	$(PY) tools/benchmark.py --suite=scale
	for suite in deploy cost paper; do $(PY) tools/benchmark.py --suite=$$suite || exit 1; done
	$(PY) tools/update_readme.py

# Every suite on tiny models (a few minutes), into a scratch directory.
benchmark-smoke: $(STAMP)
	for suite in curve deploy_axes scale deploy cost paper; do \
		$(PY) tools/benchmark.py --suite=$$suite --smoke --output_dir=/tmp/micik_benchmark_smoke || exit 1; done

$(PY):
	$(PYTHON) -m venv $(VENV)

# The stamp depends on setup.py so that a changed dependency list re-installs.
# The venv itself is order-only: its mtime changes on every install.
$(STAMP): setup.py | $(PY)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[test,demo,tfmot]"
	touch $@
