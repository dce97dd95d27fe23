"""v2 config routes: read, change (through the config handler), reload, validate."""

from __future__ import annotations

from typing import Annotated, Any

import anyio
import msgspec
from litestar import Request, get, post, put
from litestar.params import QueryParameter

from schemas import FieldError
from valkyrie.config.live import LiveConfig
from valkyrie.config.migrate import is_ancestor_document, live_only, migrate_ancestor
from valkyrie.config.model import ValkyrieConfig, is_live, unflatten
from valkyrie.config.validate import ValidationResult, validate_dotted
from valkyrie.gateway._auth import route_opt
from valkyrie.gateway._body import json_body
from valkyrie.gateway._context import GatewayDep, identity_of
from valkyrie.gateway._models import (
    ConfigChangeResponse,
    ConfigValidation,
    MigrationStepView,
    ReloadResponse,
)
from valkyrie.gateway._problems import COMMON, ProblemError, problem_responses

__all__ = [
    "ROUTES",
    "ConfigView",
    "dotted_document",
    "from_ancestor",
    "validate_layered",
    "wait_applied",
]

_SECTIONS = frozenset(
    f.name
    for f in msgspec.structs.fields(ValkyrieConfig)
    if isinstance(f.type, type) and issubclass(f.type, msgspec.Struct)
)


class ConfigView(msgspec.Struct, kw_only=True):
    """The config the gateway runs, the runtime revision, and where every value came from."""

    revision: int
    config: ValkyrieConfig
    sources: dict[str, str]
    runtime: dict[str, Any]
    applied_at_ms: int
    errors: list[FieldError] = msgspec.field(default_factory=list)


def dotted_document(doc: Any) -> tuple[dict[str, Any], list[FieldError]]:
    """A config document (nested sections and/or dotted keys) as dotted keys, or its problems.

    Every key of the result is ``section.key`` or a top-level scalar, the shape the config layers
    use, so that layering it over them can never mix a section with a scalar of the same name.
    """
    if not isinstance(doc, dict):
        return {}, [FieldError(path="(root)", reason="a config document must be a JSON object")]
    out: dict[str, Any] = {}
    errors: list[FieldError] = []
    for key, value in doc.items():
        if "." in key:
            head, _, rest = key.partition(".")
            if head in _SECTIONS and rest and "." not in rest:
                out[key] = value
            else:
                errors.append(FieldError(path=key, reason="unknown key"))
        elif key in _SECTIONS:
            if not isinstance(value, dict):
                errors.append(FieldError(path=key, reason="must be an object (a config section)"))
                continue
            for sub, sub_value in value.items():
                out[f"{key}.{sub}"] = sub_value
        else:
            out[key] = value
    return out, errors


def from_ancestor(doc: Any) -> tuple[Any, list[MigrationStepView] | None]:
    """The document to apply, and what became of each field if it was the ancestor's.

    The ancestor's config is converted as ``valkyrie config migrate`` converts it, keeping only
    the values that may change live; any other document is returned as it is.
    """
    if not is_ancestor_document(doc):
        return doc, None
    report = live_only(migrate_ancestor(doc))
    steps = [
        MigrationStepView(
            field=s.field,
            action=s.action,
            target=s.target,
            value=s.value,
            reason=s.reason,
        )
        for s in report.steps
    ]
    return report.values, steps


def validate_layered(
    live: LiveConfig, changes: dict[str, Any], *, replace: bool
) -> ValidationResult:
    """Validate ``changes`` layered on the process's base (and, unless ``replace``, its runtime)."""
    runtime = {} if replace else dict(live.runtime)
    for key, value in changes.items():
        if value is None:
            runtime.pop(key, None)  # null removes a runtime override
        else:
            runtime[key] = value
    return validate_dotted(live.loaded.with_runtime(runtime))


def _not_live(live: LiveConfig, changes: dict[str, Any]) -> list[FieldError]:
    """Keys whose value would change but cannot change without a restart."""
    current = live.loaded.with_runtime(live.runtime)
    found = []
    for key, value in sorted(changes.items()):
        if value is None or current.get(key) == value:
            continue
        ok, why = is_live(key)
        if not ok:
            found.append(
                FieldError(path=key, reason=f"cannot change live ({why}): a change is refused")
            )
    return found


async def wait_applied(live: LiveConfig, revision: int, timeout_s: float) -> bool:
    """Wait until this process runs ``revision`` (its watch applies it); whether it did in time."""
    with anyio.move_on_after(timeout_s):
        while live.revision < revision:
            await live.changed()
    return live.revision >= revision


@get(
    "/api/v2/config/valkyrie",
    opt=route_opt("config:admin"),
    summary="The effective config",
    responses=problem_responses(*COMMON),
    tags=["config"],
)
async def get_config(gateway: GatewayDep) -> ConfigView:
    """The config in force here, its runtime revision and each value's source layer.

    ``http.host`` and ``http.port`` are where this gateway really listens (source ``listening``
    when that is not what the layers say: port 0 became a free port, or a command line chose).
    """
    live = gateway.live
    config, sources = live.current, dict(live.sources())
    if gateway.listening is not None:
        host, port = gateway.listening
        if (config.http.host, config.http.port) != (host, port):
            http = msgspec.structs.replace(config.http, host=host, port=port)
            config = msgspec.structs.replace(config, http=http)
            sources["http.host"] = sources["http.port"] = "listening"
    return ConfigView(
        revision=live.revision,
        config=config,
        sources=dict(sorted(sources.items())),
        runtime=dict(live.runtime),
        applied_at_ms=int(live.applied_at * 1000),
        errors=list(live.last_error),
    )


@put(
    "/api/v2/config/valkyrie",
    opt=route_opt("config:admin", audit="config_change"),
    summary="Change the runtime config",
    description=(
        "The body is a config document, whole or partial, with nested sections or dotted keys. "
        "By default it replaces the runtime layer (keys it leaves out go back to their file, "
        "environment or default values); with `merge=true` only the keys given change (`null` "
        "removes an override). The config handler validates it; 422 lists every error. The "
        "ancestor's config document (RustCI's `ValkyrieIntegrationConfig`) is accepted too: it "
        "is converted as `valkyrie config migrate` converts it, the values that cannot change "
        "live are left out (`restart` steps), and `migration` says what became of each field."
    ),
    responses=problem_responses(400, 413, 415, 422, *COMMON),
    tags=["config"],
)
async def put_config(
    request: Request[Any, Any, Any],
    gateway: GatewayDep,
    merge: Annotated[bool, QueryParameter(description="Merge into the runtime layer.")] = False,
) -> ConfigChangeResponse:
    """Change the runtime config through the config handler."""
    _, doc = await json_body(request)
    doc, migration = from_ancestor(doc)
    changes, errors = dotted_document(doc)
    if not errors:
        errors = list(validate_layered(gateway.live, changes, replace=not merge).errors)
    if errors:
        detail = "the config document is invalid"
        if migration is not None:
            detail += " (converted from the ancestor's document, as `valkyrie config migrate` does)"
        raise ProblemError(422, detail, errors=errors)
    client = gateway.config_client(identity_of(request))
    reason = f"HTTP PUT ({'merge' if merge else 'replace'})"
    if migration is not None:
        reason += ", converted from the ancestor's config"
    if merge:
        verdict = await client.change(
            set_values=changes, reason=reason, timeout_s=gateway.timeout_s
        )
    else:
        verdict = await client.change(
            replace=unflatten(changes), reason=reason, timeout_s=gateway.timeout_s
        )
    if not verdict.accepted:
        raise ProblemError(422, "the config handler refused the change", errors=verdict.errors)
    applied = verdict.revision is not None and await wait_applied(
        gateway.live, verdict.revision, min(2.0, gateway.timeout_s)
    )
    return ConfigChangeResponse(
        accepted=True,
        revision=verdict.revision,
        diff=verdict.diff,
        warnings=verdict.warnings,
        applied_here=applied,
        migration=migration,
    )


@post(
    "/api/v2/config/valkyrie/reload",
    opt=route_opt("config:admin", audit="config_reload"),
    status_code=200,
    summary="Re-read the config bucket",
    responses=problem_responses(*COMMON),
    tags=["config"],
)
async def reload_config(gateway: GatewayDep, request: Request[Any, Any, Any]) -> ReloadResponse:
    """Apply the latest revision now (the watch normally does); return the one in force."""
    latest = await gateway.config_client(identity_of(request)).current()
    errors = gateway.live.apply(latest) if latest is not None else []
    number = latest.revision if latest is not None else 0
    return ReloadResponse(
        revision=gateway.live.revision,
        latest_revision=number,
        applied=gateway.live.revision >= number,
        errors=errors,
    )


@post(
    "/api/v2/config/valkyrie/validate",
    opt=route_opt("config:admin"),
    status_code=200,
    summary="Validate a config document",
    description=(
        "Validates a whole or partial document layered on the config in force (`replace=true`: "
        "on the base layers only, as a PUT without `merge` would). Always 200 with "
        "`{valid, errors, warnings, migration}` for any JSON body; warnings include keys that "
        "cannot change without a restart. The ancestor's config document is validated as "
        "converted, with `migration` saying what became of each field (else `null`)."
    ),
    responses=problem_responses(400, 413, 415, 422, *COMMON),
    tags=["config"],
)
async def validate_config(
    request: Request[Any, Any, Any],
    gateway: GatewayDep,
    replace: Annotated[bool, QueryParameter(description="Layer on the base only.")] = False,
) -> ConfigValidation:
    """Check a document without changing anything."""
    _, doc = await json_body(request)
    doc, migration = from_ancestor(doc)
    changes, errors = dotted_document(doc)
    if errors:
        return ConfigValidation(valid=False, errors=errors, migration=migration)
    result = validate_layered(gateway.live, changes, replace=replace)
    warnings = [*result.warnings, *_not_live(gateway.live, changes)]
    return ConfigValidation(
        valid=not result.errors, errors=result.errors, warnings=warnings, migration=migration
    )


ROUTES = [get_config, put_config, reload_config, validate_config]
