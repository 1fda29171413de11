# The front door: `make train` and `make test` set everything up themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=


.PHONY: install train train-freebase test test-faults lint lint-docker format bench bench-quality bench-throughput bench-storage bench-sharding bench-uncertainty bench-step bench-scale docker docker-gpu clean

install: $(STAMP)

# Re-runs only when requirements.txt changes; torch comes from the pinned CPU build (see README for GPU).
$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

train: install
	$(PY) -m trainer train --config configs/default.yaml $(ARGS)

# Freebase86m end to end: download + convert (once), then submit configs/freebase.yaml to the Ray cluster
# at RAY_ADDRESS (its dashboard URL), or to a Ray head started here on 127.0.0.1 when RAY_ADDRESS is empty.
# The conversion is refused unless it finds Freebase86m's published counts, and so is a FREEBASE_DIR
# converted earlier from anything else (FREEBASE_DOWNLOAD_ARGS=--skip-count-check FREEBASE_CHECK=
# converts and trains a sample, as the tests do).
FREEBASE_URL ?= https://data.dgl.ai/dataset/Freebase.zip
FREEBASE_DOWNLOADS ?= data/downloads
FREEBASE_DOWNLOAD_ARGS ?=
FREEBASE_CHECK ?= --expect freebase86m
FREEBASE_DIR ?= data/freebase86m
FREEBASE_RUN ?= runs/freebase
FREEBASE_CONFIG ?= configs/freebase.yaml
FREEBASE_ARGS ?=
LOCAL_DASHBOARD := http://127.0.0.1:8265
RAY := PATH="$(abspath $(VENV))/bin:$$PATH" RAY_AUTH_MODE=token

train-freebase: install
	test -f $(FREEBASE_DIR)/manifest.json || $(PY) -m storage download freebase86m --url "$(FREEBASE_URL)" \
		--out $(FREEBASE_DIR) --downloads $(FREEBASE_DOWNLOADS) $(FREEBASE_DOWNLOAD_ARGS)
	$(PY) -m storage info $(FREEBASE_DIR) --no-checksums $(FREEBASE_CHECK)
	@if [ -z "$(RAY_ADDRESS)" ]; then \
		test -f "$$HOME/.ray/auth_token" || $(RAY) ray get-auth-token --generate >/dev/null; \
		$(RAY) ray status >/dev/null 2>&1 || $(RAY) ray start --head --dashboard-host 127.0.0.1 --disable-usage-stats; \
	fi
	$(RAY) $(PY) -m trainer submit --address "$(or $(RAY_ADDRESS),$(LOCAL_DASHBOARD))" --config $(FREEBASE_CONFIG) \
		--dataset $(abspath $(FREEBASE_DIR)) --out $(abspath $(FREEBASE_RUN)) $(FREEBASE_ARGS)

test: install
	$(PY) -m pytest -q --durations=15

# The fault suite alone (it is also part of `make test`).
test-faults: install
	$(PY) -m pytest -q -m faults

# Python style and types, and the C kernels compiled with -Wall -Wextra -Werror (sharding/kernels/native.py).
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(PY) -m sharding.kernels.native --check

# The Dockerfile (both images: `docker` and `docker-gpu` differ only in a build argument), with
# dockerfilelint from the npm registry (hadolint is not packaged where we build).
lint-docker:
	npx --yes dockerfilelint@1.8.0 Dockerfile

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: bench-quality bench-throughput bench-storage bench-sharding bench-uncertainty bench-step

bench-quality: install
	$(PY) -m bench.quality $(ARGS)

bench-throughput: install
	$(PY) -m bench.throughput $(ARGS)

bench-storage: install
	$(PY) -m bench.storage $(ARGS)

bench-sharding: install
	$(PY) -m bench.sharding $(ARGS)

bench-uncertainty: install
	$(PY) -m bench.uncertainty $(ARGS)

bench-step: install
	$(PY) -m bench.step_profile $(ARGS)

# Not part of `make bench`: 2 workers on a 10M-entity, ~100M-fact planted graph (bench/scale.py; about 40 minutes).
bench-scale: install
	$(PY) -m bench.scale $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build nvkg.egg-info

# The trainer image with CPU torch, and with CUDA torch for GPU nodes (deploy/ray/cluster.yaml's gpu_worker).
docker:
	docker build -t nvkg:latest .

docker-gpu:
	docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t nvkg:latest-gpu .
