"""Which type travels on which subject, and the JSON Schema generated from it."""

from __future__ import annotations

from typing import Any

import msgspec

from schemas.config import ConfigChange, ConfigRevision, ConfigVerdict
from schemas.event_catalog import EVENT_KINDS, event_schema_name, event_wire_type
from schemas.events import DeadLetter, Event
from schemas.explain import ExplainRequest, JobExplanation
from schemas.health import FallbackRecord, HealthReport, HealthSummary
from schemas.jobs import JobRecord, JobSubmission, SubmitVerdict
from schemas.legacy import LegacyJobV1
from schemas.queue import QueueListing, QueueListRequest, QueueSnapshot
from schemas.runners import (
    CancelJob,
    Dispatch,
    JobLog,
    JobUpdate,
    RegistrationVerdict,
    RunnerCommand,
    RunnerHeartbeat,
    RunnerRecord,
    RunnerRegistration,
)

__all__ = ["CATALOG", "json_schema", "json_schemas"]

#: schema file name (without ``.schema.json``) -> the type it describes
CATALOG: dict[str, Any] = {
    "job-submission": JobSubmission,
    "job-submission-v1": LegacyJobV1,
    "submit-verdict": SubmitVerdict,
    "job-record": JobRecord,
    "cancel-job": CancelJob,
    "runner-registration": RunnerRegistration,
    "runner-heartbeat": RunnerHeartbeat,
    "runner-record": RunnerRecord,
    "registration-verdict": RegistrationVerdict,
    "runner-command": RunnerCommand,
    "dispatch": Dispatch,
    "job-update": JobUpdate,
    "job-log": JobLog,
    "event": Event,
    "explain-request": ExplainRequest,
    "job-explanation": JobExplanation,
    "dead-letter": DeadLetter,
    "config-change": ConfigChange,
    "config-revision": ConfigRevision,
    "config-verdict": ConfigVerdict,
    "health-report": HealthReport,
    "health-summary": HealthSummary,
    "fallback-record": FallbackRecord,
    "queue-list-request": QueueListRequest,
    "queue-listing": QueueListing,
    "queue-snapshot": QueueSnapshot,
    # one per event type: the envelope with its ``type`` fixed and its ``data`` typed
    **{event_schema_name(kind): event_wire_type(kind) for kind in EVENT_KINDS},
}


def json_schema(name: str) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of catalog entry ``name``."""
    (root,), components = msgspec.json.schema_components(
        [CATALOG[name]], ref_template="#/$defs/{name}"
    )
    schema: dict[str, Any] = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"https://valkyrie.dev/schemas/{name}.schema.json",
        "title": name,
    }
    schema.update(root)
    if components:
        schema["$defs"] = dict(sorted(components.items()))
    return schema


def json_schemas() -> dict[str, dict[str, Any]]:
    """Every catalog entry's JSON Schema, by file name."""
    return {f"{name}.schema.json": json_schema(name) for name in sorted(CATALOG)}
