"""The ASGI entry point for gunicorn/uvicorn: the only module-level app."""

import sys

from llm_backend.app import create_app
from llm_backend.config import ConfigError

try:
    app = create_app()
except ConfigError as exc:
    # one clear line instead of a traceback; exit code 3 makes gunicorn stop instead of respawning
    print(f"llm-backend: configuration error: {exc}", file=sys.stderr, flush=True)
    raise SystemExit(3) from None
