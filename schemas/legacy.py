"""The legacy v1 job body and its conversion to a v2 submission.

The ancestor's v1 API took ``{"type": ..., "payload": ...}`` and its REST bridge also mapped
``pipeline`` and ``environment``; its HTTP fallback wire format added ``job_id``, ``priority``,
``requirements`` (``max_execution_time`` in seconds), ``metadata`` and ``timeout`` (seconds until the
deadline). Conversion rules (documented in ``docs/subjects.md``):

* ``type`` becomes ``job_type``, lower-cased (the ancestor sent Rust enum names such as ``"Build"``);
* ``pipeline`` becomes ``metadata.pipeline_id``; ``environment`` becomes ``metadata.environment``;
* ``requirements.max_execution_time`` (s) becomes ``requirements.max_execution_time_s``;
* ``timeout`` (s) becomes ``deadline_at_ms = received_at_ms + timeout * 1000``;
* everything else keeps its name.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from schemas._common import Identifier, Label, NonNegativeFloat, NonNegativeInt, Priority
from schemas.jobs import JobSubmission, Requirements

__all__ = ["LegacyJobV1", "LegacyRequirementsV1", "v1_to_v2"]


class LegacyRequirementsV1(msgspec.Struct, frozen=True, kw_only=True):
    """The ancestor's requirements block (``max_execution_time`` in seconds)."""

    cpu_cores: NonNegativeFloat = 0.0
    memory_mb: NonNegativeInt = 0
    storage_gb: NonNegativeFloat = 0.0
    gpu_count: NonNegativeInt = 0
    max_execution_time: Annotated[int, msgspec.Meta(ge=1, le=7 * 24 * 3600)] = 3600
    required_capabilities: list[Label] = msgspec.field(default_factory=list)


class LegacyJobV1(msgspec.Struct, frozen=True, kw_only=True):
    """A v1 job as the ancestor's legacy API and bridge accepted it."""

    type: Label
    payload: Any = None
    job_id: Identifier | None = None
    priority: Priority = 2
    pipeline: Label | None = None
    environment: Label | None = None
    requirements: LegacyRequirementsV1 | None = None
    metadata: dict[str, str] = msgspec.field(default_factory=dict)
    timeout: Annotated[int, msgspec.Meta(ge=1)] | None = None
    idempotency_key: Annotated[str, msgspec.Meta(min_length=1, max_length=512)] | None = None


def v1_to_v2(job: LegacyJobV1, *, received_at_ms: int) -> JobSubmission:
    """Convert a v1 job to the equivalent v2 submission (pure; see the module docstring)."""
    metadata = dict(job.metadata)
    if job.pipeline is not None:
        metadata.setdefault("pipeline_id", job.pipeline)
    if job.environment is not None:
        metadata.setdefault("environment", job.environment)
    requirements = Requirements()
    if job.requirements is not None:
        r = job.requirements
        requirements = Requirements(
            cpu_cores=r.cpu_cores,
            memory_mb=r.memory_mb,
            storage_gb=r.storage_gb,
            gpu_count=r.gpu_count,
            max_execution_time_s=r.max_execution_time,
            required_capabilities=list(r.required_capabilities),
        )
    deadline = received_at_ms + job.timeout * 1000 if job.timeout is not None else None
    return JobSubmission(
        job_type=job.type.lower(),
        priority=job.priority,
        payload=job.payload,
        requirements=requirements,
        metadata=metadata,
        deadline_at_ms=deadline,
        job_id=job.job_id,
        idempotency_key=job.idempotency_key,
    )
