# llm-backend developer commands. `make install` then `make run` is the whole quick start.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8080
export HOST PORT

.PHONY: install run serve test lint format bench migrate check-deploy image k8s clean ui-test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -r requirements-dev.txt
	$(BIN)/pip install --no-deps -e .
	test -x .venv-clients/bin/python || $(PYTHON) -m venv .venv-clients
	.venv-clients/bin/pip install -q -r requirements-clients.txt

# The demo: the built-in mock model, a local SQLite database, no Azure account needed. Key checking is off
# unless LLM_BACKEND_AUTH=keys is set; the server listens on 127.0.0.1 only unless HOST says otherwise.
run: migrate
	LLM_BACKEND_CONFIG=$${LLM_BACKEND_CONFIG:-config/demo.yaml} LLM_BACKEND_AUTH=$${LLM_BACKEND_AUTH:-none} \
		$(BIN)/gunicorn -c gunicorn.conf.py llm_backend.asgi:app

serve:
	$(BIN)/gunicorn -c gunicorn.conf.py llm_backend.asgi:app

migrate:
	$(BIN)/llm-backend migrate

test:
	$(BIN)/pytest -q

lint:
	$(BIN)/ruff check llm_backend tests bench migrations
	$(BIN)/ruff format --check llm_backend tests bench migrations
	$(BIN)/mypy

format:
	$(BIN)/ruff format llm_backend tests bench migrations
	$(BIN)/ruff check --fix llm_backend tests bench migrations

bench:
	$(BIN)/python -m bench

# --- deployment (Dockerfile, k8s/, Tiltfile; see deploy/) ---
IMAGE ?= llm-backend:dev
KUBECTL ?= $(shell if [ -x $(BIN)/kubectl ]; then echo $(BIN)/kubectl; else command -v kubectl; fi)
OVERLAYS ?= dev prod

# Builds the image with docker where an engine answers; otherwise says so and runs the static checks only.
image:
	VENV=$(VENV) bash deploy/image.sh $(IMAGE)

# Renders each overlay to k8s/rendered/<overlay>.yaml (kubectl from `bash deploy/install-tools.sh`).
k8s:
	@test -n "$(KUBECTL)" || { echo "no kubectl: run bash deploy/install-tools.sh"; exit 1; }
	@mkdir -p k8s/rendered
	@for overlay in $(OVERLAYS); do \
		$(KUBECTL) kustomize k8s/overlays/$$overlay > k8s/rendered/$$overlay.yaml || exit 1; \
		echo "k8s/rendered/$$overlay.yaml"; \
	done

# Installs the check tools (idempotent) and runs the deployment checks.
check-deploy:
	VENV=$(VENV) bash deploy/install-tools.sh
	$(BIN)/pytest -q tests/deploy

clean:
	rm -rf $(VENV) .venv-clients .pytest_cache .mypy_cache .ruff_cache

# The real-browser test: Debian's chromium driven by playwright-core (installed by tests/ui/install.sh).
ui-test:
	bash tests/ui/install.sh
	$(BIN)/pytest -q tests/ui
