# The front door: `make train` and `make test` set everything up themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: install train test lint format bench bench-quality bench-throughput bench-storage bench-sharding docker clean

install: $(STAMP)

# Re-runs only when requirements.txt changes; torch comes from the pinned CPU build (see README for GPU).
$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

train: install
	$(PY) -m trainer train --config configs/default.yaml $(ARGS)

test: install
	$(PY) -m pytest -q --durations=15

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: bench-quality bench-throughput bench-storage bench-sharding

bench-quality: install
	$(PY) -m bench.quality $(ARGS)

bench-throughput: install
	$(PY) -m bench.throughput $(ARGS)

bench-storage: install
	$(PY) -m bench.storage $(ARGS)

bench-sharding: install
	$(PY) -m bench.sharding $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

docker:
	docker build -t nvkg:latest .
