"""Every typed event, the registry from ``type`` to Struct, and the envelope each one travels in."""

from __future__ import annotations

import functools
import inspect
import operator
import types
from typing import Any, Literal, Union, get_args, get_origin

import msgspec

from schemas.event_base import IDENTITY_FIELDS, TypedEvent, required_keys
from schemas.events import Event
from schemas.job_events import (
    IntakeRejected,
    JobAcceptedEvent,
    JobCancelled,
    JobCancelRequested,
    JobDispatched,
    JobDuplicate,
    JobExpired,
    JobFailed,
    JobQueued,
    JobRequeued,
    JobSloBreach,
    JobStaleUpdate,
    JobStartedEvent,
    JobSucceeded,
    JobTargetAtRisk,
    JobTargetMissed,
    JobTimedOut,
)
from schemas.ops_events import (
    AUDIT_EVENTS,
    HEALTH_CHANGED,
    ConfigChanged,
    ConfigRejected,
    DeadReplayed,
    FallbackActivated,
    FallbackOverridden,
    FallbackRecovered,
)
from schemas.runner_events import (
    RunnerBackOnline,
    RunnerDeregistered,
    RunnerDraining,
    RunnerForgotten,
    RunnerLost,
    RunnerRegistered,
    RunnerUndrained,
)

__all__ = ["EVENT_KINDS", "EVENT_TYPES", "event_schema_name", "event_wire_type", "typed_event"]

#: every kind of event Valkyrie emits, in the order the documentation lists them
EVENT_KINDS: tuple[type[TypedEvent], ...] = (
    JobQueued,
    JobDuplicate,
    JobDispatched,
    JobAcceptedEvent,
    JobStartedEvent,
    JobRequeued,
    JobSucceeded,
    JobFailed,
    JobCancelled,
    JobTimedOut,
    JobExpired,
    JobCancelRequested,
    JobStaleUpdate,
    JobSloBreach,
    JobTargetAtRisk,
    JobTargetMissed,
    IntakeRejected,
    RunnerRegistered,
    RunnerLost,
    RunnerBackOnline,
    RunnerDraining,
    RunnerUndrained,
    RunnerDeregistered,
    RunnerForgotten,
    ConfigChanged,
    ConfigRejected,
    *HEALTH_CHANGED.values(),
    FallbackActivated,
    FallbackRecovered,
    FallbackOverridden,
    DeadReplayed,
    *AUDIT_EVENTS.values(),
)


def _registry(kinds: tuple[type[TypedEvent], ...]) -> dict[str, type[TypedEvent]]:
    registry: dict[str, type[TypedEvent]] = {}
    for kind in kinds:
        if kind.event_type in registry:
            raise TypeError(
                f"{kind.__name__} and {registry[kind.event_type].__name__} share a type"
            )
        defaults = {f.encode_name: f.default for f in msgspec.structs.fields(kind)}
        if any(defaults.get(key, msgspec.NODEFAULT) is not None for key in kind.optional_keys):
            raise TypeError(f"{kind.__name__}: an optional data key must default to None")
        registry[kind.event_type] = kind
    return registry


#: ``Event.type`` -> the Struct of that kind (built once)
EVENT_TYPES: dict[str, type[TypedEvent]] = _registry(EVENT_KINDS)


def typed_event(envelope: Event, *, strict: bool = False) -> TypedEvent | None:
    """The typed event ``envelope`` carries; ``None`` for a type this version does not know.

    Unknown ``data`` keys are ignored unless ``strict`` (then an unknown type is an error too).

    Raises:
        msgspec.ValidationError: the envelope is not a valid event of its type.
    """
    kind = EVENT_TYPES.get(envelope.type)
    if kind is None:
        if strict:
            raise msgspec.ValidationError(f"unknown event type {envelope.type!r}")
        return None
    return kind.from_envelope(envelope, strict=strict)


def event_schema_name(kind: type[TypedEvent]) -> str:
    """The catalog name of ``kind``'s JSON Schema (``event-job-queued`` for ``job.queued``)."""
    return "event-" + kind.event_type.replace(".", "-").replace("_", "-")


_WIRE: dict[type[TypedEvent], type[msgspec.Struct]] = {}


def _without_none(tp: Any) -> Any:
    if get_origin(tp) in (Union, types.UnionType):
        kept = [arg for arg in get_args(tp) if arg is not type(None)]
        return functools.reduce(operator.or_, kept)
    return tp


def event_wire_type(kind: type[TypedEvent]) -> type[msgspec.Struct]:
    """The envelope of ``kind`` as a Struct: ``type`` fixed, identity and ``data`` typed.

    It is what :meth:`TypedEvent.envelope` produces and what the JSON Schema files describe.
    """
    wire = _WIRE.get(kind)
    if wire is not None:
        return wire
    own = {f.name: f for f in msgspec.structs.fields(kind)}
    required = required_keys(kind)
    data_fields: list[tuple[str, Any] | tuple[str, Any, Any]] = []
    rename: dict[str, str] = {}
    for f in own.values():
        if f.name in IDENTITY_FIELDS:
            continue
        rename[f.name] = f.encode_name
        if f.encode_name in required:
            data_fields.append((f.name, f.type))
        else:  # absent rather than null while unset
            data_fields.append((f.name, _without_none(f.type) | msgspec.UnsetType, msgspec.UNSET))
    data = msgspec.defstruct(
        f"{kind.__name__}Data",
        data_fields,
        kw_only=True,
        frozen=True,
        rename=rename,
        namespace={"__doc__": f"The data of a {kind.event_type!r} event."},
    )
    envelope_fields: list[tuple[str, Any] | tuple[str, Any, Any]] = []
    for f in msgspec.structs.fields(Event):
        if f.name == "type":
            envelope_fields.append(("type", Literal[kind.event_type]))
        elif f.name == "data":
            envelope_fields.append(("data", data))
        elif f.name == "subject_id":
            envelope_fields.append(("subject_id", str))
        elif f.name in IDENTITY_FIELDS:
            mine = own.get(f.name)
            if mine is None:
                envelope_fields.append((f.name, None, None))
            elif mine.default is msgspec.NODEFAULT:
                envelope_fields.append((f.name, mine.type))
            else:
                envelope_fields.append((f.name, mine.type, mine.default))
        else:
            envelope_fields.append((f.name, f.type))
    wire = _WIRE[kind] = msgspec.defstruct(
        f"{kind.__name__}Envelope",
        envelope_fields,
        kw_only=True,
        frozen=True,
        namespace={"__doc__": inspect.getdoc(kind)},
    )
    return wire
