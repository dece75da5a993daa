# Two commands a fresh machine needs: `make demo` and `make test`. Each creates .venv if missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# Every pip command is pinned through the constraints file: otherwise pip upgrades torch to a
# CUDA build (see README "Install").
PIP    := PIP_CONSTRAINT=$(CURDIR)/constraints.txt $(PY) -m pip
STAMP  := $(VENV)/.installed
DEMO_DIR ?= demo_out
DATA_URL ?= $(DEMO_DIR)/data

.PHONY: install demo test test-slow test-all scaling-demo bench-data clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q torch==2.13.0 torchvision==0.28.0
	$(PIP) install -q -e '.[dev]' torch==2.13.0 torchvision==0.28.0
	# The MindEye1 prior's reference implementation, for the numerical fidelity tests only: its
	# declared requirements (open-clip-torch<3, ...) conflict with ours and none is needed to import it.
	$(PIP) install -q --no-deps dalle2-pytorch==1.14.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) launchers/demo.py --out $(DEMO_DIR) --data-url $(DATA_URL)

# The default tier (CI): everything but the tests marked slow.
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

# The slow tier: end-to-end sweeps on a two-node Ray cluster, the NSD path through every launcher, ...
test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow tests

test-all: $(STAMP)
	$(PY) -m pytest -q tests

# Model-size scaling sweep on this machine and its scaling-law report (README "Scaling").
SCALING_DIR ?= scaling_out
scaling-demo: $(STAMP)
	$(PY) launchers/sweep.py --config launchers/configs/sweeps/scaling_cpu.yaml --out $(SCALING_DIR)
	$(PY) launchers/report.py $(SCALING_DIR) --out $(SCALING_DIR)/report

bench-data: $(STAMP)
	$(PY) launchers/benchmark_data.py

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
