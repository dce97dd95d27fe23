"""The typed event catalogue: one Struct per event type, its id, its data, its round trip."""

from __future__ import annotations

from typing import Any

import msgspec
import msgspec.inspect as mi
import pytest

import schemas
from schemas import (
    AUDIT_EVENTS,
    EVENT_KINDS,
    EVENT_TYPES,
    HEALTH_CHANGED,
    HEALTH_STATUSES,
    JOB_ENDED,
    TERMINAL_STATES,
    ConfigChanged,
    DeadReplayed,
    Event,
    FallbackActivated,
    FallbackOverridden,
    FallbackRecovered,
    FieldError,
    HealthDegraded,
    HealthUnhealthy,
    IntakeRejected,
    JobDispatched,
    JobDuplicate,
    JobQueued,
    JobRecord,
    JobStaleUpdate,
    JobState,
    JobSubmission,
    JobTargetMissed,
    RunnerLost,
    RunnerRegistered,
    RunnerUp,
    TypedEvent,
    event_schema_name,
    typed_event,
)
from schemas.__main__ import SUBJECTS_DOC
from schemas._eventdoc import id_template, render, render_doc
from schemas.event_base import data_keys, required_keys
from tests._event_catalogue import check_stream
from tests._helpers import config_for_test, settings_for, unique_prefix
from valkyrie import open_bus
from valkyrie.bus.codec import EVENT_DECODER, encode
from valkyrie.bus.events import EventPublisher
from valkyrie.gateway._auth import route_opt

RECORD = JobRecord(
    id="j1",
    state=JobState.QUEUED,
    spec=JobSubmission(job_type="build", priority=1, correlation_id="p-42"),
    submitted_at_ms=1_000,
    updated_at_ms=1_000,
)
#: a sample of each Struct an event's data holds
_STRUCTS: dict[type, Any] = {
    JobRecord: RECORD,
    FieldError: FieldError(path="$.priority", reason="Expected `int` <= 4"),
    RunnerUp: RunnerUp(runner_id="r2", score=0.5),
}


def _sample(tp: mi.Type) -> Any:
    """A value of type ``tp`` (the first non-null member of a union)."""
    match tp:
        case mi.Metadata():
            return _sample(tp.type)
        case mi.UnionType():
            return _sample(next(t for t in tp.types if not isinstance(t, mi.NoneType)))
        case mi.StrType():
            return "text"
        case mi.BoolType():
            return True
        case mi.IntType():
            return 7
        case mi.FloatType():
            return 0.25
        case mi.LiteralType():
            return tp.values[-1]
        case mi.ListType():
            return [_sample(tp.item_type)]
        case mi.DictType():
            return {"key": _sample(tp.value_type)}
        case mi.AnyType():
            return {"mode": {"old": "full", "new": "fallback"}}
        case mi.StructType():
            return _STRUCTS[tp.cls]
    raise AssertionError(f"no sample for {tp!r}")


def sample(kind: type[TypedEvent], *, optional: bool = True) -> TypedEvent:
    """An event of ``kind`` with every field set (optional ``data`` keys only if ``optional``)."""
    info = mi.type_info(kind)
    assert isinstance(info, mi.StructType)
    values: dict[str, Any] = {
        f.name: None if not optional and f.encode_name in kind.optional_keys else _sample(f.type)
        for f in info.fields
    }
    return kind(**values)


def envelope_of(event: TypedEvent) -> Event:
    return event.envelope(event_id=event.event_id() or "random-1", at_ms=5, source="test")


# -- the registry -----------------------------------------------------------------------------------
def _concrete(cls: type[TypedEvent]) -> set[type[TypedEvent]]:
    out = set()
    for sub in cls.__subclasses__():
        if sub.__module__.startswith("schemas.") and "event_type" in sub.__dict__:
            out.add(sub)
        out |= _concrete(sub)
    return out


def test_every_kind_is_registered_once_under_its_type() -> None:
    assert set(EVENT_KINDS) == _concrete(TypedEvent)
    assert len(EVENT_KINDS) == len(EVENT_TYPES) == 40
    for event_type, kind in EVENT_TYPES.items():
        assert kind.event_type == event_type == f"{kind.entity}.{kind.kind}"
        assert getattr(schemas, kind.__name__) is kind
        assert event_schema_name(kind) in schemas.CATALOG


def test_the_state_and_status_maps_cover_every_value() -> None:
    assert set(JOB_ENDED) == set(TERMINAL_STATES)
    assert all(kind.kind == state.value for state, kind in JOB_ENDED.items())
    assert set(HEALTH_CHANGED) == set(HEALTH_STATUSES)
    assert all(kind.kind == status for status, kind in HEALTH_CHANGED.items())
    assert all(kind.kind == action for action, kind in AUDIT_EVENTS.items())


def test_a_route_cannot_audit_an_action_without_a_typed_event() -> None:
    assert route_opt("jobs:write", audit="job_submit")["audit"] == "job_submit"
    with pytest.raises(ValueError, match="job_resubmit"):
        route_opt("jobs:write", audit="job_resubmit")


def test_a_kind_must_name_its_own_entity() -> None:
    with pytest.raises(TypeError, match="is not job"):

        class _Wrong(JobDuplicate, frozen=True, kw_only=True):
            event_type = "runner.duplicate"


# -- ids --------------------------------------------------------------------------------------------
def test_job_event_ids_are_the_ones_handlers_wrote_by_hand() -> None:
    queued = sample(JobQueued)
    assert isinstance(queued, JobQueued)
    assert queued.event_id() == f"{queued.subject_id}.queued.7"
    for state, kind in JOB_ENDED.items():
        assert sample(kind).event_id() == f"text.{state.value}.7"
    assert sample(JobTargetMissed).event_id() == "text.target_missed"
    stale = JobStaleUpdate(subject_id="j1", attempt=2, runner_id="r1", update="started", reason="x")
    assert stale.event_id() == "j1.stale.r1.2.started"
    assert JobDuplicate(subject_id="j1", stream_seq=9, stream_id="ab12").event_id() == (
        "j1.duplicate.ab12-9"
    )
    rejected = IntakeRejected(subject_id="ab12-9", errors=[], stream_seq=9)
    assert rejected.event_id() == "rejected-ab12-9"


def test_other_ids_are_the_ones_handlers_wrote_by_hand() -> None:
    lost = RunnerLost(subject_id="r1", last_heartbeat_at_ms=123, silent_ms=5, jobs=[])
    assert lost.event_id() == "r1.lost.123"
    changed = ConfigChanged(subject_id="5", changed_by="cli", at_ms=1, diff={}, reason=None)
    assert changed.event_id() == "config.changed.5"
    component = HealthDegraded(
        subject_id="nats",
        from_="healthy",
        to="degraded",
        mode="full",
        config_revision=3,
        summary_revision=9,
    )
    assert component.event_id() == "health.nats.degraded.9"
    overall = HealthUnhealthy(
        subject_id="overall",
        from_="degraded",
        to="unhealthy",
        reasons=["x"],
        mode="full",
        config_revision=3,
        summary_revision=10,
    )
    assert overall.event_id() == "health.overall.unhealthy.10"
    activated = FallbackActivated(previous_mode="full", config_revision=4, reason="r", reasons=[])
    assert (activated.subject_id, activated.event_id()) == (
        "fallback",
        "health.fallback.activated.4",
    )
    recovered = FallbackRecovered(mode="full", config_revision=None, reason="r")
    assert recovered.event_id() == "health.fallback.recovered.None"
    overridden = FallbackOverridden(
        changed_by="cli", mode="full", previous_mode="hybrid", fallback_revision=4
    )
    assert overridden.event_id() == "health.fallback.overridden.4"


@pytest.mark.parametrize(
    "kind", [RunnerRegistered, DeadReplayed, *AUDIT_EVENTS.values()], ids=lambda k: k.event_type
)
def test_kinds_without_a_natural_id_get_a_random_one(kind: type[TypedEvent]) -> None:
    assert sample(kind).event_id() is None


# -- data and round trips ---------------------------------------------------------------------------
@pytest.mark.parametrize("optional", [True, False], ids=["with-optional", "without-optional"])
@pytest.mark.parametrize("kind", EVENT_KINDS, ids=lambda k: k.event_type)
def test_every_kind_round_trips_through_its_envelope(
    kind: type[TypedEvent], optional: bool
) -> None:
    event = sample(kind, optional=optional)
    wire = encode(envelope_of(event))
    envelope = EVENT_DECODER.decode(wire)
    assert envelope.type == kind.event_type
    assert set(envelope.data) == (data_keys(kind) if optional else required_keys(kind))
    back = typed_event(envelope, strict=True)
    assert back == event
    assert back.event_id() == event.event_id()
    assert encode(envelope_of(back)) == wire
    # the generated schema type describes exactly this envelope
    assert msgspec.json.decode(wire, type=schemas.CATALOG[event_schema_name(kind)])


def test_job_queued_is_byte_for_byte_the_envelope_built_by_hand_before() -> None:
    by_hand = Event(
        id="j1.queued.0",
        type="job.queued",
        at_ms=5,
        source="intake",
        subject_id="j1",
        attempt=0,
        correlation_id="p-42",
        data={
            "job_type": "build",
            "priority": 1,
            "api_version": "v2",
            "reason": None,
            "not_before_at_ms": None,
            "record": msgspec.json.decode(encode(RECORD)),
            "revision": 3,
        },
    )
    typed = JobQueued(
        subject_id="j1",
        attempt=0,
        correlation_id="p-42",
        job_type="build",
        priority=1,
        api_version="v2",
        reason=None,
        not_before_at_ms=None,
        record=RECORD,
        revision=3,
    )
    assert typed.event_id() == by_hand.id
    assert encode(typed.envelope(event_id=by_hand.id, at_ms=5, source="intake")) == encode(by_hand)
    placed = msgspec.structs.replace(typed, record=None, revision=None, placed_attempt=1)
    assert list(placed.data()) == [
        "job_type",
        "priority",
        "api_version",
        "reason",
        "not_before_at_ms",
        "placed_attempt",
    ]


def test_health_keys_keep_their_names_and_order() -> None:
    component = HealthDegraded(
        subject_id="nats",
        from_="healthy",
        to="degraded",
        details=["x: slow"],
        mode="full",
        config_revision=3,
        summary_revision=9,
    )
    assert component.data() == {
        "from": "healthy",
        "to": "degraded",
        "details": ["x: slow"],
        "mode": "full",
        "config_revision": 3,
        "summary_revision": 9,
    }
    assert list(component.data()) == [
        "from",
        "to",
        "details",
        "mode",
        "config_revision",
        "summary_revision",
    ]


# -- decoding ---------------------------------------------------------------------------------------
def _queued_envelope(**data_changes: Any) -> Event:
    envelope = envelope_of(sample(JobQueued, optional=False))
    data = {k: v for k, v in {**envelope.data, **data_changes}.items() if v is not ...}
    return msgspec.structs.replace(envelope, data=data)


def test_an_unknown_type_is_none_for_readers_and_an_error_when_strict() -> None:
    future = Event(id="x", type="job.teleported", at_ms=1, source="v9", subject_id="j1")
    assert typed_event(future) is None
    with pytest.raises(msgspec.ValidationError, match=r"unknown event type 'job\.teleported'"):
        typed_event(future, strict=True)


def test_an_unknown_data_key_is_ignored_by_readers_and_an_error_when_strict() -> None:
    newer = _queued_envelope(shard=3)
    event = typed_event(newer)
    assert isinstance(event, JobQueued)
    assert event.job_type == "text"
    with pytest.raises(msgspec.ValidationError, match="unknown data key 'shard'"):
        typed_event(newer, strict=True)


def test_a_missing_or_mistyped_key_is_an_error() -> None:
    with pytest.raises(msgspec.ValidationError, match="missing data key 'priority'"):
        typed_event(_queued_envelope(priority=...), strict=True)
    with pytest.raises(msgspec.ValidationError, match="priority"):
        typed_event(_queued_envelope(priority=...))
    with pytest.raises(msgspec.ValidationError, match=r"\$\.placed_attempt"):
        typed_event(_queued_envelope(placed_attempt="2"))
    runner_with_attempt = msgspec.structs.replace(envelope_of(sample(RunnerRegistered)), attempt=1)
    with pytest.raises(msgspec.ValidationError, match="attempt is set"):
        typed_event(runner_with_attempt, strict=True)


def test_a_kind_decodes_only_its_own_type() -> None:
    with pytest.raises(msgspec.ValidationError, match=r"is not a 'job\.dispatched' event"):
        JobDispatched.from_envelope(_queued_envelope())


# -- over the bus -----------------------------------------------------------------------------------
@pytest.mark.nats
async def test_a_derived_id_is_stored_once_and_a_random_one_each_time(nats_url: str) -> None:
    settings = settings_for(nats_url, unique_prefix(), events_max_bytes=1 << 20)
    async with open_bus(settings, embed=False, config=config_for_test(settings).config) as (
        bus,
        _,
    ):
        events = EventPublisher(bus, "test")
        queued = sample(JobQueued, optional=False)
        first = await events.emit(queued)
        again = await events.emit(queued)  # a redone step after a crash
        registered = sample(RunnerRegistered)
        one = await events.emit(registered)
        two = await events.emit(registered)
        info = await bus.js.stream_info(bus.names.stream("events"))
        assert info.state.messages == 3
        assert first.id == again.id == "text.queued.7"
        assert one.id != two.id
        assert await check_stream(nats_url, settings.prefix) == []
        # the conftest check notices what the catalogue does not produce
        await bus.js.publish(
            bus.names.event("job", "j1", "queued"),
            encode(msgspec.structs.replace(first, data={**first.data, "shard": 1})),
            headers={"Nats-Msg-Id": "odd"},
        )
        problems = await check_stream(nats_url, settings.prefix)
        assert len(problems) == 1
        assert "unknown data key 'shard'" in problems[0]


# -- the documentation ------------------------------------------------------------------------------
def test_the_docs_table_is_generated_from_the_structs() -> None:
    text = SUBJECTS_DOC.read_text()
    assert render_doc(text) == text, "docs/subjects.md is out of date: run `python -m schemas`"
    for kind in EVENT_KINDS:
        assert f"| `{kind.event_type}` | `{kind.__name__}` |" in text


def test_the_docs_table_shows_ids_and_optional_keys() -> None:
    assert id_template(JobStaleUpdate) == "<subject_id>.stale.<runner_id>.<attempt>.<update>"
    assert id_template(RunnerRegistered) is None
    table = render()
    assert "`placed_attempt` (int, when set)" in table
    assert "`not_before_at_ms` (int or null)" in table
    drifted = SUBJECTS_DOC.read_text().replace("`<subject_id>.queued.<attempt>`", "`<x>`")
    assert render_doc(drifted) != drifted
    with pytest.raises(ValueError, match="markers"):
        render_doc("# no markers\n")
