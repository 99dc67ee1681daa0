# llm-backend developer commands. `make install` then `make run` is the whole quick start.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8080
export HOST PORT

.PHONY: install run serve test lint format bench migrate check-deploy image k8s clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -r requirements-dev.txt
	$(BIN)/pip install --no-deps -e .

# The demo: the built-in mock model, a local SQLite database, no Azure account needed.
run: migrate
	LLM_BACKEND_CONFIG=$${LLM_BACKEND_CONFIG:-config/demo.yaml} $(BIN)/gunicorn -c gunicorn.conf.py llm_backend.asgi:app

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

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
