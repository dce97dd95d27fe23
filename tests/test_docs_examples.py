"""The examples in docs/subjects.md are valid messages of the subject they are listed under.

Every ``### `<subject or bucket>` `` heading of the page must be a name ``valkyrie.Names`` builds,
and every ```` ```json ```` block below it (up to the next heading) must decode, in order, as the
types :data:`EXPECTED` lists for it. A block added, removed or moved without updating the mapping
fails the test, so the mapping and the page stay one-to-one.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import msgspec
import pytest

from schemas import (
    CancelJob,
    ConfigChange,
    ConfigRevision,
    ConfigVerdict,
    DeadLetter,
    Dispatch,
    Event,
    ExplainRequest,
    HealthReport,
    JobExplanation,
    JobLog,
    JobRecord,
    JobSubmission,
    JobUpdate,
    LegacyJobV1,
    QueueListing,
    QueueListRequest,
    RegistrationVerdict,
    RunnerCommand,
    RunnerHeartbeat,
    RunnerRecord,
    RunnerRegistration,
    SubmitVerdict,
    typed_event,
)
from valkyrie import BUCKETS, Names
from valkyrie.domain.intake import parse_submission

DOC = Path(__file__).resolve().parent.parent / "docs" / "subjects.md"
N = Names()

EVENTS = N.event("<entity>", "<id>", "<type>")
#: heading (a subject or bucket name) -> the type of each ```json block under it, in order
EXPECTED: dict[str, tuple[Any, ...]] = {
    N.submit_as("<identity>"): (
        JobSubmission,
        LegacyJobV1,
        SubmitVerdict,
        SubmitVerdict,
        SubmitVerdict,
    ),
    N.cancel_as("<identity>"): (CancelJob,),
    N.explain: (ExplainRequest, JobExplanation),
    N.queue_list: (QueueListRequest, QueueListing),
    N.register_as("<runner_id>"): (RunnerRegistration, RegistrationVerdict),
    N.heartbeat("<runner_id>"): (RunnerHeartbeat,),
    # the admin and deregister requests have no schema type: a plain object naming the runner
    N.runner_admin("<action>"): (dict[str, str], RegistrationVerdict),
    N.deregister("<runner_id>"): (dict[str, str], RegistrationVerdict),
    N.dispatch("<runner_id>"): (Dispatch,),
    N.control("<runner_id>"): (RunnerCommand, RunnerCommand),
    N.updates("<runner_id>"): (JobUpdate, JobUpdate, JobUpdate),
    N.logs("<runner_id>", "<job_id>"): (JobLog,),
    N.config_change_as("<identity>"): (ConfigChange, ConfigVerdict),
    N.health("<component>"): (HealthReport,),
    EVENTS: (Event, Event),
    N.dead("<handler>"): (DeadLetter,),
    N.bucket("jobs"): (JobRecord,),
    N.bucket("runners"): (RunnerRecord,),
    N.bucket("config"): (ConfigRevision,),
}

#: every public member of Names that builds a subject -> the heading documenting it
#: (the legacy subjects without an identity are documented under the identity-bearing ones)
SUBJECT_MEMBERS = {
    "submit": N.submit_as("<identity>"),
    "submit_as": N.submit_as("<identity>"),
    "cancel": N.cancel_as("<identity>"),
    "cancel_as": N.cancel_as("<identity>"),
    "explain": N.explain,
    "queue_list": N.queue_list,
    "register": N.register_as("<runner_id>"),
    "register_as": N.register_as("<runner_id>"),
    "heartbeat": N.heartbeat("<runner_id>"),
    "deregister": N.deregister("<runner_id>"),
    "runner_admin": N.runner_admin("<action>"),
    "dispatch": N.dispatch("<runner_id>"),
    "control": N.control("<runner_id>"),
    "updates": N.updates("<runner_id>"),
    "logs": N.logs("<runner_id>", "<job_id>"),
    "config_change": N.config_change_as("<identity>"),
    "config_change_as": N.config_change_as("<identity>"),
    "health": N.health("<component>"),
    "event": N.event("<entity>", "<id>", "<type>"),
    "audit": N.event("<entity>", "<id>", "<type>"),  # audit events are events (their table)
    "dead": N.dead("<handler>"),
}
#: members that build stream and bucket names or filters, or read subjects, not subjects
NOT_SUBJECTS = {
    "prefix",
    "stream",
    "bucket",
    "events",
    "submissions",
    "cancels",
    "config_changes",
    "sender",
    "as_sender",
}
#: service discovery: NATS micro's own protocol ($SRV.*), one row of the overview, no examples
DISCOVERY = {"service_name", "srv_subject", "srv_subjects"}
STREAMS = ("submit", "commands", "updates", "events", "logs", "dead", "audit")

_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*$")
_NAME = re.compile(r"^`([^`]+)`$")


def _sections(text: str) -> dict[str, list[str]]:
    """Heading -> the ```json blocks below it, up to the next heading.

    A level-3 heading that is one code span (``### `valkyrie.jobs.submit` ``) is keyed by the name
    in it; any other heading by its text, so that a json block under it is noticed too.
    """
    sections: dict[str, list[str]] = {}
    current = "(before the first heading)"
    lang: str | None = None  # the open fence's language, None outside a fence
    block: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if lang is not None:
            if stripped == "```":
                if lang == "json":
                    sections.setdefault(current, []).append("\n".join(block))
                lang = None
            else:
                block.append(line)
            continue
        if stripped.startswith("```"):
            lang = stripped[3:].strip()
            block = []
            continue
        heading = _HEADING.match(line)
        if heading:
            name = _NAME.match(heading.group(2))
            level = len(heading.group(1))
            current = name.group(1) if level == 3 and name else heading.group(2)
            sections.setdefault(current, [])
    assert lang is None, "docs/subjects.md has an unclosed code fence"
    return sections


SECTIONS = _sections(DOC.read_text(encoding="utf-8"))
CASES = [
    pytest.param(name, index, kind, id=f"{name}[{index}]")
    for name, kinds in EXPECTED.items()
    for index, kind in enumerate(kinds)
]


def test_every_subject_is_documented() -> None:
    members = {m for m in dir(Names) if not m.startswith("_")} - NOT_SUBJECTS - DISCOVERY
    assert members == set(SUBJECT_MEMBERS), "a subject was added to Names: document it"
    assert set(SUBJECT_MEMBERS.values()) <= set(EXPECTED)
    text = DOC.read_text(encoding="utf-8")
    assert "`$SRV.PING\\|INFO\\|STATS[.valkyrie[.<id>]]`" in text
    for stream in STREAMS:
        assert f"`{N.stream(stream)}`" in text
    for bucket in BUCKETS:
        assert f"`{N.bucket(bucket)}`" in text


def test_every_example_is_mapped() -> None:
    with_examples = {name for name, blocks in SECTIONS.items() if blocks}
    assert with_examples <= set(EXPECTED), "json examples under headings the test does not know"
    for name, kinds in EXPECTED.items():
        assert name in SECTIONS, f"docs/subjects.md has no heading `{name}`"
        assert len(SECTIONS[name]) == len(kinds), f"`{name}`: expected {len(kinds)} json blocks"


@pytest.mark.parametrize(("name", "index", "kind"), CASES)
def test_example_decodes(name: str, index: int, kind: Any) -> None:
    blocks = SECTIONS.get(name, [])
    assert index < len(blocks), f"`{name}` has no json block #{index}"
    msgspec.json.decode(blocks[index].encode(), type=kind, strict=True)


@pytest.mark.parametrize("index", [0, 1])
def test_event_examples_are_exactly_their_typed_events(index: int) -> None:
    """No unknown or missing data key, and the id the event's typed Struct derives."""
    envelope = msgspec.json.decode(SECTIONS[EVENTS][index].encode(), type=Event, strict=True)
    event = typed_event(envelope, strict=True)
    assert event is not None
    assert event.event_id() == envelope.id


@pytest.mark.parametrize("index", [0, 1])
def test_submission_examples_pass_intake(index: int) -> None:
    """The submission examples are accepted by intake's own checks, not only by their types."""
    body = SECTIONS[N.submit_as("<identity>")][index].encode()
    parsed = parse_submission(body, received_at_ms=1_795_765_891_808, max_bytes=1024 * 1024)
    assert parsed.api_version == ("v2", "v1")[index]


def test_the_warnings_example_is_what_intake_answers() -> None:
    """The verdict shown for a body with a typo and an ancestor name has intake's own warnings."""
    body = {
        "job_type": "shell",
        "requirments": {"cpu_cores": 2},
        "deadline": "2030-01-01T00:00:00Z",
    }
    text = DOC.read_text(encoding="utf-8")
    assert f"For\n`{json.dumps(body)}`:" in text, "the body the example is for"
    example = msgspec.json.decode(
        SECTIONS[N.submit_as("<identity>")][3].encode(), type=SubmitVerdict
    )
    parsed = parse_submission(
        json.dumps(body).encode(), received_at_ms=1_795_765_891_808, max_bytes=1024 * 1024
    )
    assert list(parsed.warnings) == example.warnings
    assert example.accepted
