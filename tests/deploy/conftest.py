"""Fixtures of the deployment checks: the kubectl to use and every kustomization rendered once."""

from __future__ import annotations

from typing import Any

import pytest

from tests.deploy.support import KUSTOMIZATIONS, find_kubectl, render


@pytest.fixture(scope="session")
def kubectl() -> str:
    path, why = find_kubectl()
    if path is None:
        pytest.skip(why)
    return path


@pytest.fixture(scope="session")
def rendered(kubectl: str) -> dict[str, list[dict[str, Any]]]:
    """Objects of every kustomization, keyed by its directory under k8s/."""
    return {name: render(kubectl, name) for name in KUSTOMIZATIONS}
