"""The ASGI entry point for gunicorn/uvicorn: the only module-level app."""

from llm_backend.app import create_app
from llm_backend.config import ConfigError
from llm_backend.logs import report_config_error

try:
    app = create_app()
except ConfigError as exc:
    # one clear line per problem instead of a traceback; exit code 3 makes gunicorn stop instead of respawning
    report_config_error(exc.problems)
    raise SystemExit(3) from None
