# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Both create .venv if it is missing and install the kit with its dependencies (idempotent:
# re-installs only when pyproject.toml changes).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mmpfl-installed
PYTEST_ARGS ?=

.PHONY: install lint demo test test-fast research reproduce bench docs notebooks-clean clean flower-sim flower-deploy flower-deploy-secure

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

## lint: ruff (lint rules and the formatter's check) and mypy on mmpfl_core/, configured in pyproject.toml
lint: $(STAMP)
	$(VENV)/bin/ruff check mmpfl_core
	$(VENV)/bin/ruff format --check mmpfl_core
	$(VENV)/bin/mypy mmpfl_core

## demo: the main job on the embedded synthetic cohort (results/ holds its outputs)
demo: $(STAMP)
	$(VENV)/bin/mmpfl demo

## test: every tier but research: unit, integration, notebooks (papermill, smoke parameters), the Flower deployment
test: $(STAMP)
	$(PY) -m pytest -m "not research" $(PYTEST_ARGS)

## test-fast: unit + integration (no notebooks, no Flower/Ray, no deployment), under 4 minutes on 2 cores
test-fast: $(STAMP)
	$(PY) -m pytest -m "unit or integration" $(PYTEST_ARGS)

## research: claims checked at full defaults (e.g. notebook 01 at its defaults, ~5 minutes on 2 cores)
research: $(STAMP)
	$(PY) -m pytest -m research $(PYTEST_ARGS)

## reproduce: the research tier, then the paper-style reproduction at teaching scale (results/reproduce-teaching/)
reproduce: research
	$(VENV)/bin/mmpfl reproduce --preset teaching

## bench: benchmarks that print ratios (bench/results/)
bench: $(STAMP)
	$(PY) bench/run_all.py

## flower-sim: `flwr run` of the Flower app on Flower's simulation engine (Ray), one virtual SuperNode per site,
## behind a SuperLink on 127.0.0.1 that is stopped afterwards. FLOWER_CONFIG overrides flower_app/pyproject.toml,
## e.g. make flower-sim FLOWER_CONFIG="preset='quickstart' method='mm-pfl-adp' num-rounds=3" FLOWER_SITES=5
FLOWER_CONFIG ?= preset='reproduce_smoke' method='fedavg,dp-fedavg'
FLOWER_SITES ?= 3
flower-sim: $(STAMP)
	$(PY) flower_app/deploy_loopback.py --engine simulation --sites $(FLOWER_SITES) --run-config "$(FLOWER_CONFIG)"

## flower-deploy: a SuperLink and one SuperNode per site on 127.0.0.1 (insecure, loopback only), the app, clean shutdown
flower-deploy: $(STAMP)
	$(PY) flower_app/deploy_loopback.py --sites $(FLOWER_SITES) --run-config "$(FLOWER_CONFIG)"

## flower-deploy-secure: the same with TLS (a throw-away CA made at run time) and SuperNode authentication;
## one unregistered SuperNode tries to join and is refused
flower-deploy-secure: $(STAMP)
	$(PY) flower_app/deploy_loopback.py --sites $(FLOWER_SITES) --secure --intruders 1 --run-config "$(FLOWER_CONFIG)"

## docs: the rendered pages in site/ (git-ignored): every notebook as HTML with its outputs and figures embedded, and an
## index.html in notebook order. It renders the executed copies `make test` keeps in build/executed/ (or
## $MMPFL_EXECUTED_NOTEBOOKS) and runs at the smoke settings only the notebooks that have none; then it checks that
## every notebook rendered and every image is there. CI passes DOCS_ARGS=--require-executed (no second run).
DOCS_ARGS ?=
docs: $(STAMP)
	$(PY) docs/build_site.py $(DOCS_ARGS)

## notebooks-clean: strip outputs from committed notebooks
notebooks-clean: $(STAMP)
	$(PY) -m mmpfl_core.notebook_tools.strip notebooks/*.ipynb

clean:
	rm -rf results site build/executed .pytest_cache .hypothesis
