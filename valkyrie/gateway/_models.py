"""Request and response bodies that exist only on HTTP (the bus messages are the ``schemas``)."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from schemas import FieldError, JobRecord, JobState, RunnerRecord, RunnerState

__all__ = [
    "CancelResponse",
    "ConfigChangeResponse",
    "ConfigDocument",
    "ConfigValidation",
    "FallbackRequest",
    "FallbackResponse",
    "JobList",
    "MigrationStepView",
    "Pagination",
    "ReloadResponse",
    "RunnerList",
    "RunnerStatusChange",
    "RunnerStatusResponse",
    "SubmitResponse",
    "V1CancelResponse",
    "V1JobStatus",
    "V1RunnerList",
    "V1RunnerSummary",
    "V1Status",
    "V1SubmitResponse",
]


class SubmitResponse(msgspec.Struct, kw_only=True):
    """The answer to a submission: the job (the original one when ``duplicate``)."""

    job_id: str
    state: JobState
    duplicate: bool
    api_version: Literal["v1", "v2"]
    job: JobRecord
    warnings: list[FieldError] = msgspec.field(default_factory=list)


class CancelResponse(msgspec.Struct, kw_only=True):
    """A cancel request was stored; ``job`` is the record as it was when the request was made."""

    job_id: str
    cancel_requested: bool
    state: JobState
    job: JobRecord


class Pagination(msgspec.Struct, kw_only=True):
    """Where a page sits in the filtered list."""

    limit: int
    offset: int
    has_more: bool


class JobList(msgspec.Struct, kw_only=True):
    """A page of jobs; ``total_count`` counts every job, ``filtered_count`` those matching."""

    jobs: list[JobRecord]
    total_count: int
    filtered_count: int
    pagination: Pagination


class RunnerList(msgspec.Struct, kw_only=True):
    """A page of runners and pool figures over the runners matching the filters."""

    runners: list[RunnerRecord]
    total_count: int
    filtered_count: int
    healthy_count: int
    total_capacity: int
    used_capacity: int
    current_utilization: float
    pagination: Pagination


class RunnerStatusChange(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Drain or undrain a runner: ``{"status": "draining"|"active"}`` or ``{"drain": bool}``."""

    status: Literal["draining", "active"] | None = None
    drain: bool | None = None


class RunnerStatusResponse(msgspec.Struct, kw_only=True):
    """The runner's state after the registry applied the change."""

    runner_id: str
    state: RunnerState | None
    drain_requested: bool


#: a config document: nested sections (``{"dispatch": {"accept_timeout_ms": 3000}}``) or dotted
#: keys (``{"dispatch.accept_timeout_ms": 3000}``), whole or partial
ConfigDocument = dict[str, Any]


class MigrationStepView(msgspec.Struct, kw_only=True):
    """What became of one field of the ancestor's config document.

    ``action``: ``mapped`` (same meaning), ``changed`` (unit or shape converted), ``dropped`` (no
    equivalent), ``restart`` (converted, but it cannot change live: set it in the config file or
    environment) or ``unknown``.
    """

    field: str
    action: Literal["mapped", "changed", "dropped", "restart", "unknown"]
    target: str | None
    value: Any
    reason: str


class ConfigChangeResponse(msgspec.Struct, kw_only=True):
    """An accepted change: the new revision and what changed.

    ``migration`` is set when the body was the ancestor's config document: what became of each
    of its fields (the change holds the converted values).
    """

    accepted: bool
    revision: int | None
    diff: dict[str, Any] = msgspec.field(default_factory=dict)
    warnings: list[FieldError] = msgspec.field(default_factory=list)
    applied_here: bool = False
    migration: list[MigrationStepView] | None = None


class ReloadResponse(msgspec.Struct, kw_only=True):
    """The revision the gateway runs after re-reading the config bucket."""

    revision: int
    latest_revision: int
    applied: bool
    errors: list[FieldError] = msgspec.field(default_factory=list)


class ConfigValidation(msgspec.Struct, kw_only=True):
    """Whether a (partial) config document, layered on the config in force, is valid.

    ``migration`` is set when the document was the ancestor's (validated as converted).
    """

    valid: bool
    errors: list[FieldError] = msgspec.field(default_factory=list)
    warnings: list[FieldError] = msgspec.field(default_factory=list)
    migration: list[MigrationStepView] | None = None


class FallbackRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Switch fallback mode on (``mode=fallback``) or off (back to the mode before it)."""

    enable: bool = False


class FallbackResponse(msgspec.Struct, kw_only=True):
    """The integration mode after the change."""

    fallback_mode: bool
    integration_mode: str
    previous_mode: str | None
    revision: int | None
    message: str


#: the ancestor's job status vocabulary (``V1_STATUS`` maps our states onto it)
V1Status = Literal["queued", "dispatched", "running", "completed", "failed", "cancelled", "timeout"]


class V1SubmitResponse(msgspec.Struct, kw_only=True):
    """The ancestor's v1 submit answer."""

    job_id: str
    status: Literal["submitted"]
    message: str


class V1JobStatus(msgspec.Struct, kw_only=True):
    """The ancestor's v1 job status, in its vocabulary (times are epoch-second strings)."""

    job_id: str
    status: V1Status
    message: str
    runner_id: str | None = None
    created_at: str | None = None
    started_at: str | None = None
    completed_at: str | None = None
    exit_code: int | None = None
    error: str | None = None


class V1CancelResponse(msgspec.Struct, kw_only=True):
    """The ancestor's v1 cancel answer."""

    job_id: str
    status: Literal["cancelling"]
    message: str


class V1RunnerSummary(msgspec.Struct, kw_only=True):
    """One runner in the ancestor's v1 list."""

    runner_id: str
    status: RunnerState
    capabilities: list[str]
    current_load: float
    max_capacity: int
    region: str | None
    last_seen: str


class V1RunnerList(msgspec.Struct, kw_only=True):
    """The ancestor's v1 runner list."""

    runners: list[V1RunnerSummary]
    count: int
    message: str
