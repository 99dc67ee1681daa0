# syntax=docker/dockerfile:1
# llm-backend container image: a build stage that resolves the dependencies into a virtualenv, and a slim
# runtime stage that runs gunicorn as an unprivileged user on a read-only root filesystem.
#
#   docker build -t llm-backend .
#   docker run --rm -p 8080:8080 -e LLM_BACKEND_CONFIG=/app/config/demo.yaml -e LLM_BACKEND_AUTH=none llm-backend
#
# The only writable places the app needs are /app/data (LLM_BACKEND_DATA_DIR: the recorder's spill file,
# the default SQLite database) and /tmp (gunicorn's worker heartbeat files); Kubernetes mounts emptyDirs
# there (k8s/base/deployment.yaml).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first, in their own layer: it is rebuilt only when requirements.txt changes.
COPY requirements.txt ./
RUN pip install -r requirements.txt
# The package itself (no dependencies: they are all above) for its `llm-backend` console script.
COPY pyproject.toml README.md ./
COPY llm_backend ./llm_backend
RUN pip install --no-deps . \
    && python -m compileall -q /opt/venv/lib

FROM ${PYTHON_IMAGE} AS runtime
# The numeric user the process runs as (Kubernetes checks runAsNonRoot against a numeric USER).
ARG APP_UID=10001
# Owner of the source files in /app: root by default so the app cannot change its own code; the Tiltfile
# sets it to the app user so that live_update can sync sources into a running dev container.
ARG SOURCE_OWNER=0:0
RUN groupadd --system --gid ${APP_UID} app \
    && useradd --system --uid ${APP_UID} --gid ${APP_UID} --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin app
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOST=0.0.0.0 \
    PORT=8080 \
    LLM_BACKEND_DATA_DIR=/app/data \
    DATABASE_URL=sqlite:////app/data/llm_backend.db \
    LOG_FORMAT=json
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
# PYTHONPATH=/app: the sources in /app are what gunicorn and `llm-backend migrate` import (and what Tilt's
# live_update replaces); openapi/, migrations/ and alembic.ini sit beside them where the app looks.
COPY --chown=${SOURCE_OWNER} gunicorn.conf.py alembic.ini ./
COPY --chown=${SOURCE_OWNER} openapi ./openapi
COPY --chown=${SOURCE_OWNER} migrations ./migrations
COPY --chown=${SOURCE_OWNER} config ./config
COPY --chown=${SOURCE_OWNER} llm_backend ./llm_backend
RUN python -m compileall -q /app/llm_backend /app/migrations \
    && mkdir -p /app/data \
    && chown ${APP_UID}:${APP_UID} /app/data
USER ${APP_UID}:${APP_UID}
EXPOSE 8080
# Liveness of the process as Docker sees it; Kubernetes uses its own probes. Python, not curl: the slim
# image has no curl.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8080'), timeout=4)"]
STOPSIGNAL SIGTERM
CMD ["gunicorn", "-c", "gunicorn.conf.py", "llm_backend.asgi:app"]
