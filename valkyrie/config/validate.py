"""Config validation: every problem at once, each with its dotted path, plus warnings."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin

import msgspec

from schemas import FieldError, collect_errors, integral_floats
from valkyrie.config.model import ValkyrieConfig, unflatten

__all__ = ["ValidationResult", "validate_dotted"]


@dataclass(frozen=True)
class ValidationResult:
    """The config when valid, else ``None``; errors and warnings with dotted paths."""

    config: ValkyrieConfig | None
    errors: list[FieldError] = field(default_factory=list)
    warnings: list[FieldError] = field(default_factory=list)


def _struct_items(tp: Any) -> type[msgspec.Struct] | None:
    """The Struct type of ``list[Struct]`` (e.g. ``http.tokens``), else ``None``."""
    if get_origin(tp) is list:
        (item,) = get_args(tp)
        if isinstance(item, type) and issubclass(item, msgspec.Struct):
            return item
    return None


@functools.cache
def _fields(tp: type[msgspec.Struct]) -> dict[str, msgspec.structs.FieldInfo]:
    # resolving a Struct's annotations takes milliseconds: once per type is enough
    return {f.encode_name: f for f in msgspec.structs.fields(tp)}


def _unknown(tp: type[msgspec.Struct], obj: Mapping[str, Any], prefix: str) -> list[FieldError]:
    errors: list[FieldError] = []
    fields = _fields(tp)
    for key, value in obj.items():
        if key not in fields:
            errors.append(FieldError(path=f"{prefix}{key}", reason="unknown key"))
            continue
        sub = fields[key].type
        if isinstance(sub, type) and issubclass(sub, msgspec.Struct) and isinstance(value, dict):
            errors.extend(_unknown(sub, value, f"{prefix}{key}."))
        item = _struct_items(sub)
        if item is not None and isinstance(value, list):
            for index, entry in enumerate(value):
                if isinstance(entry, dict):
                    errors.extend(_unknown(item, entry, f"{prefix}{key}[{index}]."))
    return errors


def _path(error: FieldError) -> FieldError:
    # schemas paths look like "$.dispatch.x"; config paths are plain dotted keys
    path = error.path[2:] if error.path.startswith("$.") else error.path.lstrip("$")
    return FieldError(path=path or "(root)", reason=error.reason)


#: a well-formed dotted key: ``name`` or ``section.name``
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)?")


def _malformed(dotted: Mapping[str, Any]) -> list[FieldError]:
    """Keys that cannot be a config key at all.

    Those are keys with an empty part or too many dots, and a name given both as a value and as a
    section with keys (``features`` and ``features.x``): :func:`unflatten` cannot nest them.
    """
    sections = {key.partition(".")[0] for key in dotted if "." in key}
    errors = []
    for key in dotted:
        if not _KEY.fullmatch(key):
            errors.append(FieldError(path=key or '""', reason="unknown key"))
        elif "." not in key and key in sections:
            errors.append(FieldError(path=key, reason="given both as a value and as a section"))
    return errors


def validate_dotted(dotted: Mapping[str, Any]) -> ValidationResult:
    """Validate a dotted mapping as a whole config.

    Every problem comes back at once: malformed and unknown keys, bad values, and the cross-field
    rules of the keys that are themselves valid (checked on the config with the bad keys left at
    their defaults, leaving out rules that involve a bad key).
    """
    malformed = _malformed(dotted)
    if malformed:
        bad = {e.path for e in malformed}
        rest = validate_dotted({k: v for k, v in dotted.items() if (k or '""') not in bad})
        return ValidationResult(None, [*malformed, *rest.errors], rest.warnings)
    nested = unflatten(dotted)
    try:  # the common case, valid: one conversion, then the rules
        try:
            config = msgspec.convert(nested, ValkyrieConfig)
        except msgspec.ValidationError:
            # 1.0 for an integer key is that integer (JSON Schema counts it as one)
            nested = integral_floats(ValkyrieConfig, nested)
            config = msgspec.convert(nested, ValkyrieConfig)
    except msgspec.ValidationError as e:
        refused = e
    else:
        errors, warnings = _rules(config)
        return ValidationResult(None if errors else config, errors, warnings)
    errors = _unknown(ValkyrieConfig, nested, "")
    errors += [
        _path(e)
        for e in collect_errors(ValkyrieConfig, nested)
        # reported above with the exact path of the unknown key
        if not e.reason.startswith("Object contains unknown field")
    ]
    if not errors:  # msgspec refused it but no field check found why: say what msgspec said
        return ValidationResult(None, [FieldError(path="(root)", reason=str(refused))])
    errors = _dedupe(errors)
    warnings = []
    salvaged = _salvage(dotted, errors)
    if salvaged is not None:
        valid_part, bad = salvaged
        rule_errors, rule_warnings = _rules(valid_part)
        errors += [e for e in rule_errors if not any(_involves(e, key) for key in bad)]
        warnings = [w for w in rule_warnings if not any(_involves(w, key) for key in bad)]
    return ValidationResult(None, errors, warnings)


def _covers(key: str, path: str) -> bool:
    """Whether dotted ``key`` is, contains, or is inside the value at error ``path``."""
    return (
        key == path
        or path.startswith((f"{key}.", f"{key}["))
        or key.startswith((f"{path}.", f"{path}["))
    )


def _involves(problem: FieldError, key: str) -> bool:
    return _covers(key, problem.path) or key in problem.reason


def _salvage(
    dotted: Mapping[str, Any], errors: list[FieldError]
) -> tuple[ValkyrieConfig, set[str]] | None:
    """The config without the keys that have errors (they keep their defaults), and those keys."""
    bad = {key for key in dotted if any(_covers(key, e.path) for e in errors)}
    try:
        config = msgspec.convert(
            unflatten({k: v for k, v in dotted.items() if k not in bad}), ValkyrieConfig
        )
    except (msgspec.ValidationError, TypeError):
        return None
    return config, bad


def _dedupe(errors: list[FieldError]) -> list[FieldError]:
    seen: set[tuple[str, str]] = set()
    out = []
    for e in errors:
        if (e.path, e.reason) not in seen:
            seen.add((e.path, e.reason))
            out.append(e)
    return out


@dataclass(frozen=True, slots=True)
class _Rule:
    """A cross-field rule: how bad breaking it is, the path it names, why it is broken (if so)."""

    level: Literal["error", "warning"]
    path: str
    #: the reasons ``config`` breaks the rule: none when it keeps it
    broken: Callable[[ValkyrieConfig], Iterable[str]]


def _error(path: str, reason: str, broken: Callable[[ValkyrieConfig], bool]) -> _Rule:
    return _Rule("error", path, lambda c: [reason] if broken(c) else [])


def _warning(path: str, reason: str, broken: Callable[[ValkyrieConfig], bool]) -> _Rule:
    return _Rule("warning", path, lambda c: [reason] if broken(c) else [])


def _twice_named_tokens(c: ValkyrieConfig) -> list[str]:
    names = [t.name for t in c.http.tokens]
    return [
        f"token name {dup!r} is used twice"
        for dup in sorted({n for n in names if names.count(n) > 1})
    ]


def _http_on_metrics_address(c: ValkyrieConfig) -> list[str]:
    http, o = c.http, c.observability
    clash = (
        http.enabled
        and o.metrics_enabled
        and http.port
        and http.port == o.metrics_port
        and http.host == o.metrics_host
    )
    return [f"same address as observability.metrics_port ({http.port})"] if clash else []


def _in_production(broken: Callable[[ValkyrieConfig], bool]) -> Callable[[ValkyrieConfig], bool]:
    return lambda c: c.profile == "production" and broken(c)


#: The cross-field rules, in the order their errors and warnings are reported.
_RULES: tuple[_Rule, ...] = (
    _error(
        "health.consumer_lag_degraded",
        "must be below health.consumer_lag_unhealthy",
        lambda c: c.health.consumer_lag_degraded >= c.health.consumer_lag_unhealthy,
    ),
    _error(
        "health.kv_latency_degraded_ms",
        "must be below health.kv_latency_unhealthy_ms",
        lambda c: c.health.kv_latency_degraded_ms >= c.health.kv_latency_unhealthy_ms,
    ),
    _error(
        "health.stale_after_ms",
        "must exceed health.report_interval_ms (reports would look stale)",
        lambda c: c.health.stale_after_ms <= c.health.report_interval_ms,
    ),
    _error(
        "dispatch.supervise_interval_ms",
        "must be below dispatch.runner_lost_after_ms",
        lambda c: c.dispatch.supervise_interval_ms >= c.dispatch.runner_lost_after_ms,
    ),
    _warning(
        "dispatch.runner_lost_after_ms",
        "above 5000 ms: lost runners' jobs wait longer than 5 s",
        lambda c: c.dispatch.runner_lost_after_ms > 5000,
    ),
    _error(
        "security.tls_cert_file",
        "required when security.tls_enabled is true",
        lambda c: c.security.tls_enabled and not c.security.tls_cert_file,
    ),
    _error(
        "security.tls_key_file",
        "required when security.tls_enabled is true",
        lambda c: c.security.tls_enabled and not c.security.tls_key_file,
    ),
    _warning(
        "http.tokens",
        "http.auth_required is true but no token is configured: every call is refused",
        lambda c: c.http.auth_required and not c.http.tokens,
    ),
    _Rule("error", "http.tokens", _twice_named_tokens),
    _warning(
        "http.rate_limit_burst",
        "below rate_limit_per_s: a full second's allowance cannot burst",
        lambda c: c.http.rate_limit_burst < c.http.rate_limit_per_s,
    ),
    _Rule("error", "http.port", _http_on_metrics_address),
    _warning(
        "http.cors_origins",
        "'*' with authentication lets any site call the API with a token",
        lambda c: "*" in c.http.cors_origins and c.http.auth_required,
    ),
    _warning(
        "security.tls_enabled",
        "TLS is off in production",
        _in_production(lambda c: not c.security.tls_enabled),
    ),
    _warning(
        "http.auth_required",
        "the HTTP bridge accepts unauthenticated calls in production",
        _in_production(lambda c: not c.http.auth_required),
    ),
    _warning(
        "security.audit_enabled",
        "auditing is off in production",
        _in_production(lambda c: not c.security.audit_enabled),
    ),
)


def _rules(c: ValkyrieConfig) -> tuple[list[FieldError], list[FieldError]]:
    errors: list[FieldError] = []
    warnings: list[FieldError] = []
    for rule in _RULES:
        found = errors if rule.level == "error" else warnings
        found.extend(FieldError(path=rule.path, reason=reason) for reason in rule.broken(c))
    return errors, warnings
