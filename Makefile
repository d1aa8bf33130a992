# l2sweep: the two commands are `make run` and `make test`; the rest are conveniences.
# Every target is idempotent: a second call reuses the venv, the data and DVC's cache.

SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# `dvc plots show/diff`'s page template with vega inlined, so the pages draw offline (.dvc/config).
PLOTS_PAGE := .dvc/plots/offline.html
export PATH := $(abspath $(BIN)):$(PATH)

HOST ?= 127.0.0.1
PORT ?= 5000
TRACKING_URI ?= sqlite:///mlruns/mlflow.db
# `make server`: the team's tracking server (README "Team server"). SERVER_DB is its
# PostgreSQL database; ARTIFACTS is where it stores the artifacts clients send it (a folder,
# s3://..., gs://...); clients need only the server's URL.
SERVER_DB ?= postgresql+psycopg2://mlflow@127.0.0.1:5432/mlflow
ARTIFACTS ?= ./mlartifacts
WORKERS ?= 2
# MLflow's server also starts job-runner processes for GenAI features this project does not use.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION ?= false

# Debian packages: the default dataset, and what the test suite drives (browser, PostgreSQL,
# a one-node SLURM cluster with job accounting: tests/e2e/test_slurm.py).
DATA_PKGS := dataset-fashion-mnist
TEST_PKGS := chromium chromium-driver postgresql slurm-wlm munge slurmdbd mariadb-server
CAN_APT := $(shell [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && echo yes)

.PHONY: help install data sysdeps-test run repro test test-fast ci-gate ci-baseline ui server bench clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(STAMP): requirements.lock pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	@touch $(STAMP)

install: $(STAMP)  ## create .venv, install the locked dependencies and offline vega
	@$(BIN)/python tools/offline_plots.py  # writes $(PLOTS_PAGE) unless it is up to date

# Debian ships Fashion-MNIST; elsewhere `prepare` downloads it from the Keras mirror.
data:  ## make the default dataset available (apt on Debian/Ubuntu as root)
	@if [ -d /usr/share/datasets/fashion-mnist ] || ls data/raw/fashion_mnist/*ubyte* >/dev/null 2>&1; then \
	  echo "Fashion-MNIST: present"; \
	elif [ "$(CAN_APT)" = yes ]; then \
	  (apt-get install -y -qq $(DATA_PKGS) || (apt-get update -qq && apt-get install -y -qq $(DATA_PKGS))) >/dev/null; \
	else \
	  echo "Fashion-MNIST: not installed locally; prepare will download it from the Keras mirror"; \
	fi

sysdeps-test:
	@if [ "$(CAN_APT)" = yes ]; then \
	  missing=""; for p in $(DATA_PKGS) $(TEST_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then echo "apt-get install$$missing"; \
	    (apt-get install -y -qq $$missing || (apt-get update -qq && apt-get install -y -qq $$missing)) >/dev/null; fi; \
	else echo "not root or no apt: tests needing chromium/postgresql/slurm will skip"; fi

run: install data  ## set up, then run the whole pipeline (dvc repro)
	dvc repro
	@echo
	@echo "Report:     reports/report.md  (figures in reports/figures/)"
	@echo "Metrics:    dvc metrics show   |  plots: dvc plots show"
	@echo "MLflow UI:  make ui  ->  http://$(HOST):$(PORT)"
	@# The sweep's runs (MLflow 3.17's UI opens experiments in its GenAI view unless workflowType says otherwise).
	@python -c "from mlflow import MlflowClient; e = MlflowClient('$(TRACKING_URI)').get_experiment_by_name('l2-sweep'); \
	  print(f'Runs:       http://$(HOST):$(PORT)/#/experiments/{e.experiment_id}?workflowType=machine_learning') if e else None"

repro: install  ## dvc repro without the setup steps
	dvc repro

# Two processes at most (a test file each: module fixtures such as the SLURM cluster stay in one):
# the suite waits on subprocesses much of the time, so 2 cores run it in about 60 % of the time.
PYTEST_PAR := -n auto --maxprocesses 2 --dist loadfile

test: install sysdeps-test  ## set up, then run the test suite
	pytest $(PYTEST_PAR)

test-fast: install  ## the suite without tests marked slow
	pytest $(PYTEST_PAR) -m "not slow"

# The regression gate on a tiny configuration (.ci/params-tiny.yaml), as .ci/run does it.
CI_TINY := L2SWEEP_PARAMS=.ci/params-tiny.yaml
ci-tiny-pipeline: install data
	rm -rf .ci/out
	$(CI_TINY) python -m l2sweep.prepare
	$(CI_TINY) python -m l2sweep.train -m
	$(CI_TINY) python -m l2sweep.evaluate

ci-gate: ci-tiny-pipeline  ## tiny pipeline + regression gate against .ci/baseline-tiny.json
	$(CI_TINY) python -m l2sweep.gate --baseline .ci/baseline-tiny.json --current .ci/out/reports/evaluation.json

ci-baseline: ci-tiny-pipeline  ## refresh .ci/baseline-tiny.json after an intended change
	cp .ci/out/reports/evaluation.json .ci/baseline-tiny.json

ui: install  ## serve the MLflow UI for the embedded store on 127.0.0.1:5000
	mlflow ui --backend-store-uri $(TRACKING_URI) --host $(HOST) --port $(PORT) --workers $(WORKERS)

server: install  ## team MLflow server: PostgreSQL (SERVER_DB), proxied artifacts (ARTIFACTS), 127.0.0.1:5000
	mlflow server --backend-store-uri $(SERVER_DB) --artifacts-destination $(ARTIFACTS) \
	  --host $(HOST) --port $(PORT) --workers $(WORKERS)

bench: install data  ## side-by-side speed benchmark (see bench/README.md)
	python -m bench.run $(BENCH_ARGS)

clean:  ## remove generated outputs (keeps .venv, data/raw and the MLflow store)
	rm -rf outputs .pytest_cache
