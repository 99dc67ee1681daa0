#!/usr/bin/env bash
# Builds the container image where a Docker engine answers; elsewhere runs the static Dockerfile checks.
#
#   bash deploy/image.sh [IMAGE]          # IMAGE defaults to llm-backend:dev
#
# The static checks (hadolint, deploy/check_dockerfile.py) run in both cases; without an engine the script
# says so plainly and exits 0, because there is nothing more this machine can do.
set -euo pipefail

cd "$(dirname "$0")/.."
IMAGE=${1:-llm-backend:dev}
VENV=${VENV:-.venv}
PYTHON="$VENV/bin/python"
[ -x "$PYTHON" ] || PYTHON=python3

"$PYTHON" deploy/check_dockerfile.py Dockerfile
if [ -x "$VENV/bin/hadolint" ] || command -v hadolint >/dev/null 2>&1; then
    HADOLINT="$VENV/bin/hadolint"
    [ -x "$HADOLINT" ] || HADOLINT=$(command -v hadolint)
    "$HADOLINT" Dockerfile
    echo "Dockerfile: hadolint passed"
else
    echo "Dockerfile: hadolint not installed (bash deploy/install-tools.sh); skipped it"
fi

if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
    exec docker build --tag "$IMAGE" .
fi
echo "make image: NO DOCKER ENGINE on this machine ('docker info' does not answer), so the image was NOT built."
echo "make image: the Dockerfile passed the static checks above; build it where Docker runs: docker build -t $IMAGE ."
