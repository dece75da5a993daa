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

.PHONY: install demo test test-all bench-data clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q torch==2.13.0 torchvision==0.28.0
	$(PIP) install -q -e '.[dev]' torch==2.13.0 torchvision==0.28.0
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) launchers/demo.py --out $(DEMO_DIR) --data-url $(DATA_URL)

test: $(STAMP)
	$(PY) -m pytest -q tests

bench-data: $(STAMP)
	$(PY) launchers/benchmark_data.py

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
