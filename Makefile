# llm-backend developer commands. `make install` then `make run` is the whole quick start; `make` (or
# `make help`) lists the targets: each documented one has a `## description` after its name.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8080
export HOST PORT

.PHONY: help install run serve test lint format bench migrate check-deploy image k8s clean ui-test
.DEFAULT_GOAL := help

help: ## list the targets and the variables they read
	@echo 'usage: make <target> [VAR=value ...]'
	@echo
	@awk 'BEGIN {FS = ":[^#]*## "} /^[a-zA-Z0-9_-]+:[^=]*## / {printf "  %-13s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo
	@echo 'variables: HOST=$(HOST) PORT=$(PORT) VENV=$(VENV) PYTHON=$(PYTHON) IMAGE=$(IMAGE) OVERLAYS="$(OVERLAYS)"'
	@echo 'first time: make install, then make run (the mock model on http://$(HOST):$(PORT))'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

install: $(BIN)/python ## create the virtualenv (VENV, default .venv) and install llm-backend with its dev tools
	$(BIN)/pip install -r requirements-dev.txt
	$(BIN)/pip install --no-deps -e .
	test -x .venv-clients/bin/python || $(PYTHON) -m venv .venv-clients
	.venv-clients/bin/pip install -q -r requirements-clients.txt

# The demo: the built-in mock model, a local SQLite database, no Azure account needed. Key checking is off
# unless LLM_BACKEND_AUTH=keys is set; the server listens on 127.0.0.1 only unless HOST says otherwise.
run: migrate ## migrate and serve config/demo.yaml (the mock model) on HOST:PORT, key checks off
	LLM_BACKEND_CONFIG=$${LLM_BACKEND_CONFIG:-config/demo.yaml} LLM_BACKEND_AUTH=$${LLM_BACKEND_AUTH:-none} \
		$(BIN)/gunicorn -c gunicorn.conf.py llm_backend.asgi:app

serve: ## serve with gunicorn.conf.py and the environment's configuration
	$(BIN)/gunicorn -c gunicorn.conf.py llm_backend.asgi:app

migrate: ## upgrade the database (DATABASE_URL, default ./llm_backend.db) to the current schema
	$(BIN)/llm-backend migrate

test: ## run the test suite (TEST_DATABASE_URL / TEST_REDIS_URL add PostgreSQL and Redis)
	$(BIN)/pytest -q

lint: ## ruff (lint and format check) and mypy, as CI runs them
	$(BIN)/ruff check llm_backend tests bench migrations
	$(BIN)/ruff format --check llm_backend tests bench migrations
	$(BIN)/mypy

format: ## reformat and autofix with ruff
	$(BIN)/ruff format llm_backend tests bench migrations
	$(BIN)/ruff check --fix llm_backend tests bench migrations

bench: ## benchmark: the upstream directly vs through llm-backend (analytics at scale: python -m bench.analytics)
	$(BIN)/python -m bench
	$(BIN)/python -m bench --streams 10000

# --- deployment (Dockerfile, k8s/, Tiltfile; see deploy/) ---
IMAGE ?= llm-backend:dev
KUBECTL ?= $(shell if [ -x $(BIN)/kubectl ]; then echo $(BIN)/kubectl; else command -v kubectl; fi)
OVERLAYS ?= dev prod

# Builds the image with docker where an engine answers; otherwise says so and runs the static checks only.
image: ## build the container image IMAGE (static checks only without docker)
	VENV=$(VENV) bash deploy/image.sh $(IMAGE)

# Renders each overlay to k8s/rendered/<overlay>.yaml (kubectl from `bash deploy/install-tools.sh`).
k8s: ## render each of OVERLAYS to k8s/rendered/<overlay>.yaml
	@test -n "$(KUBECTL)" || { echo "no kubectl: run bash deploy/install-tools.sh"; exit 1; }
	@mkdir -p k8s/rendered
	@for overlay in $(OVERLAYS); do \
		$(KUBECTL) kustomize k8s/overlays/$$overlay > k8s/rendered/$$overlay.yaml || exit 1; \
		echo "k8s/rendered/$$overlay.yaml"; \
	done

# Installs the check tools (idempotent) and runs the deployment checks.
check-deploy: ## install the deployment check tools and run the deployment tests
	VENV=$(VENV) bash deploy/install-tools.sh
	$(BIN)/pytest -q tests/deploy

clean: ## delete the virtualenvs and the tool caches
	rm -rf $(VENV) .venv-clients .pytest_cache .mypy_cache .ruff_cache

# The real-browser test: Debian's chromium driven by playwright-core (installed by tests/ui/install.sh).
ui-test: ## the real-browser test (installs chromium and playwright-core first)
	bash tests/ui/install.sh
	$(BIN)/pytest -q tests/ui
