"""The OpenAPI document: Litestar's, plus the request bodies the routes decode themselves.

Routes read raw bodies (so that they meet the bus's own validation and report every error), which
Litestar cannot see; their schemas come from the same msgspec Structs, by
``msgspec.json.schema_components``, and are added to the document Litestar built.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import msgspec
from litestar import Litestar
from litestar.openapi.spec import (
    Components,
    OpenAPI,
    OpenAPIMediaType,
    RequestBody,
    SecurityScheme,
)
from litestar.routes import HTTPRoute

from schemas import JobSubmission, LegacyJobV1, RunnerRegistration
from valkyrie.config.model import ValkyrieConfig
from valkyrie.gateway._models import FallbackRequest, RunnerStatusChange

__all__ = ["BODIES", "finish_openapi", "openapi_json", "write_openapi"]

_REF = "#/components/schemas/{name}"
SECURITY_SCHEME = "bearerAuth"

#: (path, method) -> (body types, whether a body is required, description)
BODIES: dict[tuple[str, str], tuple[tuple[Any, ...], bool, str]] = {
    ("/api/v2/jobs", "post"): (
        (JobSubmission, LegacyJobV1),
        True,
        "A v2 `JobSubmission`, or a v1 body (`type` without `job_type`).",
    ),
    ("/api/v1/jobs", "post"): (
        (LegacyJobV1,),
        True,
        'The ancestor\'s v1 body: `{"type": ..., "payload": ...}`.',
    ),
    ("/api/v2/runners/{runner_id}/status", "put"): (
        (RunnerStatusChange,),
        True,
        'Either `{"status": "draining"|"active"}` or `{"drain": true|false}`.',
    ),
    ("/api/v2/runners/register", "post"): ((RunnerRegistration,), True, "A runner registration."),
    ("/api/v2/config/valkyrie", "put"): (
        (ValkyrieConfig,),
        True,
        "A config document, whole or partial (nested sections, or dotted keys such as "
        '`{"dispatch.accept_timeout_ms": 3000}`).',
    ),
    ("/api/v2/config/valkyrie/validate", "post"): (
        (ValkyrieConfig,),
        True,
        "A config document, whole or partial, to check without changing anything.",
    ),
    ("/api/v2/integration/fallback", "post"): (
        (FallbackRequest,),
        False,
        '`{"enable": true}` to enter fallback mode, `{"enable": false}` to leave it.',
    ),
}


#: what a body must also satisfy beyond its Struct's schema (rules the route checks itself)
_RULES: dict[Any, dict[str, Any]] = {
    # exactly one of the two, not null (the route refuses {} and both at once)
    RunnerStatusChange: {
        "oneOf": [
            {"required": ["status"], "properties": {"status": {"enum": ["draining", "active"]}}},
            {"required": ["drain"], "properties": {"drain": {"type": "boolean"}}},
        ]
    },
}


def _body_schema(types: tuple[Any, ...], refs: dict[Any, dict[str, Any]]) -> dict[str, Any]:
    if len(types) == 1:
        rules = _RULES.get(types[0])
        return {"allOf": [refs[types[0]]], **rules} if rules else refs[types[0]]
    return {"anyOf": [refs[t] for t in types]}


def finish_openapi(app: Litestar) -> OpenAPI:
    """Add request bodies, the bearer security scheme and each route's scope to the document."""
    openapi = app.openapi_schema  # built once and cached: what /schema/openapi.json serves
    types = sorted({t for spec in BODIES.values() for t in spec[0]}, key=lambda t: t.__name__)
    roots, components = msgspec.json.schema_components(types, ref_template=_REF)
    refs = dict(zip(types, roots, strict=True))
    if openapi.components is None or isinstance(openapi.components, list):
        openapi.components = Components()
    schemas = openapi.components.schemas
    for name, schema in sorted(components.items()):
        # msgspec's schema is the wire contract's (the same as schemas/json); it replaces
        # Litestar's rendering of the same Struct, if any, so that both agree everywhere
        schemas[name] = cast(Any, schema)
    openapi.components.security_schemes = {
        SECURITY_SCHEME: SecurityScheme(
            type="http",
            scheme="bearer",
            description="A token from `http.tokens` (only its SHA-256 is configured).",
        )
    }
    for route in app.routes:
        if not isinstance(route, HTTPRoute):
            continue
        item = (openapi.paths or {}).get(route.path_format)
        if item is None:
            continue
        for handler in route.route_handlers:
            scope = handler.opt.get("scope")
            for method in handler.http_methods:
                operation = getattr(item, method.lower(), None)
                if operation is None:
                    continue
                declared = {str(status) for status in (handler.responses or {})}
                if "400" not in declared and operation.responses:
                    # Litestar documents its own 400 for parameter errors; they are 422 here
                    operation.responses.pop("400", None)
                body = BODIES.get((route.path_format, method.lower()))
                if body is not None:
                    operation.request_body = RequestBody(
                        content={
                            "application/json": OpenAPIMediaType(
                                schema=cast(Any, _body_schema(body[0], refs))
                            )
                        },
                        required=body[1],
                        description=body[2],
                    )
                if scope is not None:
                    operation.security = [{SECURITY_SCHEME: []}]
                    note = f"Scope: `{scope}` (when `http.auth_required`)."
                    operation.description = (
                        f"{operation.description}\n\n{note}" if operation.description else note
                    )
    return openapi


def openapi_json(app: Litestar) -> str:
    """The document as stable, diff-friendly JSON (sorted keys, two-space indents)."""
    document = app.openapi_schema.to_schema()
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_openapi(app: Litestar, path: Path) -> None:
    """Write the document to ``path``."""
    path.write_text(openapi_json(app))
