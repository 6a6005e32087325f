# The two commands in the README: `make demo` and `make test`. Each sets up .venv on first use.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements.lock | cksum | cut -d' ' -f1)

.PHONY: setup demo test bench lint

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q -c requirements.lock -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/appliance demo --home .demo-home

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest -q

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/vault_ingest.py --mb 20 --big-gb 2 --write docs/BENCHMARKS.md
	$(VENV)/bin/python benchmarks/train_throughput.py --steps 30 --write docs/BENCHMARKS.md

lint: $(STAMP)
	$(VENV)/bin/ruff check appliance bundles tests benchmarks
