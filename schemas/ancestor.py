"""The ancestor's v2 request shapes, converted to this contract (pure).

Its v2 submission used the same structure as :class:`~schemas.JobSubmission` under six older names
with other units; its runner registration had another shape altogether. Both are converted here
rather than dropped: every field with a meaning here becomes that field, and each conversion is
reported as a warning naming what the field became (``docs/subjects.md`` and
``docs/http-api.md`` list the rules). Fields without a meaning are reported as warnings too.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import uuid
from collections.abc import Callable
from typing import Any

from schemas.jobs import FieldError

__all__ = [
    "ANCESTOR_SUBMISSION_FIELDS",
    "AncestorConversion",
    "is_ancestor_registration",
    "registration_from_ancestor",
    "submission_from_ancestor",
]


class AncestorConversion:
    """A converted body, the warnings describing the conversion, errors, and renamed paths.

    ``renamed`` maps a path in the converted body to the ancestor's path it came from, so that an
    error found later in the converted body names the field the client sent.
    """

    __slots__ = ("body", "errors", "renamed", "warnings")

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body
        self.warnings: list[FieldError] = []
        self.errors: list[FieldError] = []
        self.renamed: dict[str, str] = {}

    def rename_errors(self, errors: list[FieldError]) -> list[FieldError]:
        """``errors`` with paths in converted fields changed to the ancestor's names."""
        out = []
        for error in errors:
            path = error.path
            for new, old in self.renamed.items():
                if path == new or path.startswith((new + ".", new + "[")):
                    path = old + path[len(new) :]
                    break
            out.append(FieldError(path=path, reason=error.reason))
        return out


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _keep_int(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


#: (section, ancestor name, new name, converter, unit note); ``deadline`` is converted on its own
_SUBMISSION_RULES: list[tuple[str, str, str, Callable[[Any], Any], str]] = [
    ("requirements", "max_execution_time", "max_execution_time_s", lambda v: v, "seconds"),
    ("qos_requirements", "max_latency", "max_latency_ms", lambda v: v, "milliseconds"),
    ("qos_requirements", "min_throughput", "min_throughput_bytes_per_s", lambda v: v, "bytes/s"),
    (
        "performance_targets",
        "max_dispatch_latency",
        "max_dispatch_latency_ms",
        lambda v: _keep_int(v / 1000) if _number(v) else v,
        "microseconds there, milliseconds here",
    ),
    (
        "performance_targets",
        "target_completion_time",
        "target_completion_time_s",
        lambda v: v,
        "seconds",
    ),
]
#: every ancestor name a v2 submission may carry (paths)
ANCESTOR_SUBMISSION_FIELDS = frozenset(
    {"$.deadline"}
    | {f"$.{section}.{old}" for section, old, _, _, _ in _SUBMISSION_RULES if section}
)


def _deadline_ms(value: Any) -> int | None:
    """An RFC 3339 date-time as epoch milliseconds (``None`` if it is not one)."""
    if not isinstance(value, str):
        return None
    text = value.strip()
    if text[-1:] in ("z", "Z"):
        text = text[:-1] + "+00:00"
    try:
        at = dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    if at.tzinfo is None or "T" not in text.upper():
        return None  # RFC 3339 needs a time and an offset
    return int(at.timestamp() * 1000)


def submission_from_ancestor(obj: dict[str, Any]) -> AncestorConversion:
    """Convert the ancestor's six v2 names in a submission body to this contract's.

    ``requirements.max_execution_time`` (s), ``qos_requirements.max_latency`` (ms),
    ``qos_requirements.min_throughput`` (bytes/s), ``performance_targets.max_dispatch_latency``
    (µs, divided by 1000), ``performance_targets.target_completion_time`` (s) and ``deadline`` (an
    RFC 3339 date-time) become the fields named with their unit. When the new name is given too,
    it wins and the ancestor's is ignored with a warning. A ``deadline`` that is not an RFC 3339
    date-time is an error (the ancestor silently made it now + 1 h).
    """
    body = dict(obj)
    conversion = AncestorConversion(body)
    if "deadline" in body:
        value = body.pop("deadline")
        if "deadline_at_ms" in obj:
            conversion.warnings.append(
                FieldError(path="$.deadline", reason="ignored: deadline_at_ms is given")
            )
        else:
            at_ms = _deadline_ms(value)
            if at_ms is None:
                conversion.errors.append(
                    FieldError(
                        path="$.deadline",
                        reason=f"{value!r} is not an RFC 3339 date-time with an offset "
                        "(e.g. 2030-01-01T12:00:00Z); or send deadline_at_ms",
                    )
                )
            else:
                body["deadline_at_ms"] = at_ms
                conversion.renamed["$.deadline_at_ms"] = "$.deadline"
                conversion.warnings.append(
                    FieldError(
                        path="$.deadline",
                        reason=f"the ancestor's field, converted to deadline_at_ms={at_ms}",
                    )
                )
    for section, old, new, convert, unit in _SUBMISSION_RULES:
        part = body.get(section)
        if not isinstance(part, dict) or old not in part:
            continue
        part = body[section] = dict(part)
        value = part.pop(old)
        old_path, new_path = f"$.{section}.{old}", f"$.{section}.{new}"
        if new in part:
            conversion.warnings.append(
                FieldError(path=old_path, reason=f"ignored: {section}.{new} is given")
            )
            continue
        part[new] = convert(value)
        conversion.renamed[new_path] = old_path
        conversion.warnings.append(
            FieldError(
                path=old_path,
                reason=f"the ancestor's field ({unit}), converted to {section}.{new}={part[new]!r}",
            )
        )
    return conversion


#: the ancestor's registration: keys only it has (at the top, and in ``capabilities``)
_ANCESTOR_TOP = frozenset({"endpoint", "protocol_support", "geographic_location"})
_ANCESTOR_CAPS = frozenset(
    {
        "supported_job_types",
        "supported_languages",
        "supported_frameworks",
        "cpu_cores",
        "memory_gb",
        "storage_gb",
        "gpu_count",
        "gpu_type",
        "container_runtime",
        "max_concurrent_jobs",
        "average_job_duration",
        "performance_tier",
        "custom_capabilities",
    }
)


_NEW_CAPS = frozenset({"job_types", "languages", "frameworks", "custom"})
_KNOWN_TOP = _ANCESTOR_TOP | {
    "runner_id",
    "capabilities",
    "location",
    "metadata",
    "resources",
    "labels",
    "heartbeat_interval_ms",
    "session_id",
    "max_concurrent_jobs",
    "performance_tier",
}


def is_ancestor_registration(obj: Any) -> bool:
    """Whether a registration body is in the ancestor's shape (keys only that shape has)."""
    if not isinstance(obj, dict):
        return False
    caps = obj.get("capabilities")
    return bool(_ANCESTOR_TOP & obj.keys()) or (
        isinstance(caps, dict) and bool(_ANCESTOR_CAPS & caps.keys())
    )


def _text_map(value: Any) -> dict[str, str] | None:
    if not isinstance(value, dict):
        return None
    return {str(k): v if isinstance(v, str) else _json_text(v) for k, v in value.items()}


def _json_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value) if value is not None else ""


def _ancestor_runner_id(obj: dict[str, Any]) -> str:
    """The id of a runner registered without one: stable for an endpoint, else random."""
    endpoint = obj.get("endpoint")
    if isinstance(endpoint, str) and endpoint:
        return "ancestor-" + hashlib.sha256(endpoint.encode()).hexdigest()[:16]
    return "ancestor-" + uuid.uuid4().hex[:16]


def registration_from_ancestor(obj: dict[str, Any]) -> AncestorConversion:
    """Convert the ancestor's ``RunnerRegistration`` to a :class:`~schemas.RunnerRegistration` body.

    ``capabilities.supported_job_types`` / ``supported_languages`` / ``supported_frameworks``
    become ``capabilities.job_types`` / ``languages`` / ``frameworks`` (job types lower-cased, as
    v1 job types are); ``custom_capabilities`` and ``container_runtime`` become
    ``capabilities.custom`` entries; ``cpu_cores``, ``memory_gb`` (times 1024, as ``memory_mb``),
    ``storage_gb``, ``gpu_count``, ``gpu_type`` become ``resources``; ``max_concurrent_jobs`` and
    ``performance_tier`` (lower-cased) keep their names at the top; ``geographic_location``'s
    ``region``, ``zone``, ``datacenter`` become ``location``; ``endpoint`` is kept as
    ``metadata.endpoint``; ``metadata`` keeps its entries (values as text). A missing
    ``runner_id`` is made up: ``ancestor-`` and 16 hex digits, derived from the endpoint when
    there is one (so a repeated registration gets the same id), else random.
    ``average_job_duration``, ``protocol_support`` and ``geographic_location.coordinates`` have no
    meaning here: warnings say so.
    """
    conversion = AncestorConversion({})
    body = conversion.body
    warn = conversion.warnings.append
    if "runner_id" in obj:
        body["runner_id"] = obj["runner_id"]
    else:
        body["runner_id"] = _ancestor_runner_id(obj)
        warn(FieldError(path="$.runner_id", reason=f"missing: registered as {body['runner_id']}"))
    caps_in = obj.get("capabilities")
    caps_in = caps_in if isinstance(caps_in, dict) else {}
    caps = _capabilities(caps_in, conversion)
    resources = _resources(caps_in, conversion)
    _capacity_and_tier(obj, caps_in, conversion)
    _location(obj, conversion)
    _metadata(obj, conversion)
    if "protocol_support" in obj:
        warn(
            FieldError(
                path="$.protocol_support",
                reason="ignored: runners speak the NATS protocol (docs/runners.md)",
            )
        )
    for name in ("labels", "heartbeat_interval_ms", "session_id"):
        if name in obj:  # the new names are taken too
            body[name] = obj[name]
    given = obj.get("resources")
    if isinstance(given, dict):
        resources.update(given)
    elif given is not None:
        body["resources"] = given  # not an object: its type error names it
    if resources and "resources" not in body:
        body["resources"] = resources
    if caps:
        body["capabilities"] = caps
    for key in obj.keys() - _KNOWN_TOP:
        warn(FieldError(path=f"$.{key}", reason="unknown field, ignored"))
    for key in caps_in.keys() - _ANCESTOR_CAPS - _NEW_CAPS:
        warn(FieldError(path=f"$.capabilities.{key}", reason="unknown field, ignored"))
    conversion.warnings.insert(
        0,
        FieldError(
            path="$",
            reason="the ancestor's registration shape, converted (docs/http-api.md lists how)",
        ),
    )
    return conversion


def _capabilities(caps_in: dict[str, Any], conversion: AncestorConversion) -> dict[str, Any]:
    """The ``capabilities`` object: renamed lists, and the custom entries."""
    caps: dict[str, Any] = {}
    for old, new in (
        ("supported_job_types", "job_types"),
        ("supported_languages", "languages"),
        ("supported_frameworks", "frameworks"),
    ):
        if old in caps_in:
            value = caps_in[old]
            if old == "supported_job_types" and isinstance(value, list):
                value = [v.lower() if isinstance(v, str) else v for v in value]
            caps[new] = value
            conversion.renamed[f"$.capabilities.{new}"] = f"$.capabilities.{old}"
    for new in _NEW_CAPS:
        if new in caps_in:  # the new names are taken too
            caps.setdefault(new, caps_in[new])
    custom = _text_map(caps_in.get("custom_capabilities")) or {}
    if "container_runtime" in caps_in and caps_in["container_runtime"] is not None:
        custom["container_runtime"] = _json_text(caps_in["container_runtime"])
    if custom:
        caps["custom"] = {**custom, **(caps.get("custom") or {})}
        conversion.renamed["$.capabilities.custom"] = "$.capabilities.custom_capabilities"
    if "average_job_duration" in caps_in:
        conversion.warnings.append(
            FieldError(
                path="$.capabilities.average_job_duration",
                reason="ignored: placement measures how long jobs of each type take",
            )
        )
    return caps


def _resources(caps_in: dict[str, Any], conversion: AncestorConversion) -> dict[str, Any]:
    """The ``resources`` the ancestor kept among its capabilities (memory in MiB here)."""
    resources: dict[str, Any] = {}
    for name in ("cpu_cores", "storage_gb", "gpu_count", "gpu_type"):
        if name in caps_in:
            resources[name] = caps_in[name]
            conversion.renamed[f"$.resources.{name}"] = f"$.capabilities.{name}"
    if "memory_gb" in caps_in:
        gb = caps_in["memory_gb"]
        resources["memory_mb"] = _keep_int(gb * 1024) if _number(gb) else gb
        conversion.renamed["$.resources.memory_mb"] = "$.capabilities.memory_gb"
    return resources


def _capacity_and_tier(
    obj: dict[str, Any], caps_in: dict[str, Any], conversion: AncestorConversion
) -> None:
    """``max_concurrent_jobs`` and ``performance_tier``, at the top or among the capabilities."""
    for name in ("max_concurrent_jobs", "performance_tier"):
        value = caps_in.get(name, obj.get(name))
        if name in caps_in or name in obj:
            conversion.body[name] = (
                value.lower() if name == "performance_tier" and isinstance(value, str) else value
            )
            if name in caps_in:
                conversion.renamed[f"$.{name}"] = f"$.capabilities.{name}"


def _location(obj: dict[str, Any], conversion: AncestorConversion) -> None:
    """``geographic_location`` (or ``location``) as ``location``; its coordinates are ignored."""
    location_in = obj.get("geographic_location", obj.get("location"))
    if not isinstance(location_in, dict):
        return
    conversion.body["location"] = {
        k: location_in[k] for k in ("region", "zone", "datacenter") if k in location_in
    }
    if "geographic_location" in obj:
        conversion.renamed["$.location"] = "$.geographic_location"
    if "coordinates" in location_in:
        conversion.warnings.append(
            FieldError(
                path="$.geographic_location.coordinates",
                reason="ignored: placement matches regions, not distances",
            )
        )


def _metadata(obj: dict[str, Any], conversion: AncestorConversion) -> None:
    """``metadata`` as text, with the ancestor's ``endpoint`` kept there."""
    metadata = _text_map(obj.get("metadata")) or {}
    if isinstance(obj.get("endpoint"), str):
        metadata.setdefault("endpoint", obj["endpoint"])
        conversion.warnings.append(
            FieldError(
                path="$.endpoint",
                reason="kept as metadata.endpoint: runners here take work over NATS, "
                "not at an endpoint",
            )
        )
    if metadata:
        conversion.body["metadata"] = metadata
