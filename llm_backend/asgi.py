"""The ASGI entry point for gunicorn/uvicorn: the only module-level app."""

from llm_backend.app import create_app

app = create_app()
