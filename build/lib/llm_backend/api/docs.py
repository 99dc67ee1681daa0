"""The served spec and Swagger UI: Connexion's, with a `servers` entry that points at this server."""

from __future__ import annotations

import typing as t

from connexion.middleware.swagger_ui import SwaggerUIAPI, SwaggerUIMiddleware
from connexion.spec import Specification


class _SpecAPI(SwaggerUIAPI):
    """Connexion serves the spec with `servers: [{url: ''}]` when the API sits at the root, which leaves
    Swagger UI's Servers list with one blank entry; name the server instead: the root path the request
    came in under (a reverse proxy's prefix included), "/" at the root."""

    def _spec_for_prefix(self, request: t.Any) -> dict[str, t.Any]:
        spec = super()._spec_for_prefix(request)
        base = self._base_path_for_prefix(request)
        spec["servers"] = [{"url": f"{base}/" if base else "/", "description": "this server"}]
        return spec


class DocsMiddleware(SwaggerUIMiddleware):
    """SwaggerUIMiddleware serving the spec through _SpecAPI."""

    def add_api(
        self,
        specification: Specification,
        base_path: str | None = None,
        arguments: dict[str, t.Any] | None = None,
        **kwargs: t.Any,
    ) -> None:
        api = _SpecAPI(
            specification, base_path=base_path, arguments=arguments, default=self.default_fn, **kwargs
        )
        self.router.mount(api.base_path, app=api.router)
