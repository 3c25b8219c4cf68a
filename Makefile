# The README's two commands: `make demo` and `make test`. Both create or refresh .venv themselves.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint compose-test bench gpu-check clean test-tools

venv: $(STAMP)

# Reinstall only when the project's declared dependencies or pins change.
# ranklog[mlflow-server] (the full mlflow, for tests/test_mlflow.py's real `mlflow server`) is
# optional: where it cannot be installed the MLflow tests skip with the reason
# (RANKLOG_REQUIRE_MLFLOW=1, as .ci/run sets, fails them instead).
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[collector,torch,dev,integrations]'
	$(PY) -m pip install -q -c constraints.txt -e '.[mlflow-server]' \
		|| echo "make: could not install ranklog[mlflow-server]; the MLflow tests will skip" >&2
	touch $(STAMP)

demo: venv
	rm -rf demo-output
	WANDB_MODE=$${WANDB_MODE:-offline} $(VENV)/bin/torchrun --standalone --nproc-per-node 2 \
		-m ranklog.demo --output_dir demo-output --logger_type async,tensorboard,wandb

lint: venv
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/mypy

# LazyFS (tests/test_power_cut.py) from ../shared/tools/lazyfs/build.sh, which installs its
# Debian packages as root; elsewhere the test skips with the reason (RANKLOG_REQUIRE_LAZYFS=1, as
# .ci/run sets, fails it instead).
LAZYFS_DIR ?= $(abspath ../shared/tools/lazyfs)
LAZYFS_BUILD ?= /var/tmp/ranklog-lazyfs
export RANKLOG_LAZYFS_DIR := $(LAZYFS_DIR)
export RANKLOG_LAZYFS_BUILD := $(LAZYFS_BUILD)

# tmux and Prometheus for tests/test_watch.py (a live `ranklog top`, a real scrape), on Debian
# as root; elsewhere those tests skip with the reason (RANKLOG_REQUIRE_TMUX=1 and
# RANKLOG_REQUIRE_PROMETHEUS=1, as .ci/run sets, fail them instead). The tests never use
# Debian's prometheus service: they start their own server, config and storage.
test-tools:
	@if { ! command -v tmux || ! test -x /usr/bin/prometheus; } >/dev/null 2>&1 \
		&& [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -q --no-install-recommends tmux prometheus \
		|| echo "make: could not install tmux/prometheus; their tests will skip" >&2; \
	fi
	@if test -f $(LAZYFS_DIR)/build.sh && command -v dpkg >/dev/null 2>&1; then \
		bash $(LAZYFS_DIR)/build.sh $(LAZYFS_BUILD) >/dev/null \
		|| echo "make: could not build LazyFS; tests/test_power_cut.py will skip" >&2; \
	else \
		echo "make: no LazyFS sources or not Debian; tests/test_power_cut.py will skip" >&2; \
	fi

# The suite on TEST_WORKERS pytest-xdist workers (a test file stays on one worker), then the
# tests marked serial alone: LazyFS crashed once under a second worker's load, and a timing
# ratio should be measured on a quiet machine.
TEST_WORKERS ?= 2
test: lint test-tools
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not serial" --durations=20
	$(PY) -m pytest -q -m serial --durations=5

compose-test: venv
	$(PY) -m pytest -q -p no:cacheprovider tests/compose -m compose

# The GPU checks, one command: the real-CUDA tests (no host sync in emit, CUDA values and a
# CUDA step arrive) and the step-time bench. Both skip with the reason where no CUDA device
# exists; RANKLOG_REQUIRE_CUDA=1 (for a GPU runner) makes that a failure.
gpu-check: venv
	$(PY) -m pytest -q -rs -p no:cacheprovider tests/test_cuda_values.py -k RealCuda
	$(PY) bench/gpu_step.py

bench: venv
	$(PY) bench/emit.py
	$(PY) bench/record_path.py
	$(PY) bench/collector.py
	$(PY) bench/scale.py

clean:
	rm -rf $(VENV) demo-output .pytest_cache .mypy_cache .ruff_cache
