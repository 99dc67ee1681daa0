"""Benchmark of llm-backend against a fake upstream: run with ``python -m bench`` (see ``--help``)."""
