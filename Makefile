# The two commands a new user needs: `make benchmark` (the full benchmark, demo profile) and `make test`.
SHELL := /bin/bash
VENV ?= .venv
BIN := $(VENV)/bin
PROFILE ?= demo
export PD_STATE_DIR ?= $(CURDIR)/.pd
export PREFECT_HOME ?= $(PD_STATE_DIR)/prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
# Nothing is fetched from a model hub at run time, and caches stay in the state directory.
export HF_HUB_OFFLINE := 1
export MPLCONFIGDIR ?= $(PD_STATE_DIR)/cache/matplotlib
PD_PREFECT_PORT ?= 4200
API := http://127.0.0.1:$(PD_PREFECT_PORT)/api

.PHONY: install benchmark smoke down test clean-state

# The environment: created once, re-installed when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

install: $(VENV)/.installed

# Server + worker (reused when running), deployments, one full-benchmark run followed in the terminal
# (progress lines and stage states; on failure the error and the log's path, and make stops), then the results.
benchmark: install
	$(BIN)/pd up
	@PREFECT_API_URL=$(API) $(BIN)/pd follow full-benchmark/$(PROFILE)
	@$(BIN)/pd results

smoke:
	$(MAKE) benchmark PROFILE=smoke

down:
	@if [ -x $(BIN)/pd ]; then $(BIN)/pd down; fi

test: install
	$(BIN)/python -m pytest -q

clean-state: down
	rm -rf $(PD_STATE_DIR)
