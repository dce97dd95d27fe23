"""What each integration mode allows, as pure functions."""

from __future__ import annotations

from schemas import FieldError, JobSubmission
from valkyrie.config.model import IntegrationMode

__all__ = ["V2_ONLY_FIELDS", "check_intake_mode", "uses_advanced_placement"]

#: Fields that have no v1 equivalent: refused in compatibility mode.
V2_ONLY_FIELDS = (
    "qos_requirements",
    "routing_hints",
    "performance_targets",
    "retry_policy",
    "labels",
)


def check_intake_mode(
    spec: JobSubmission, api_version: str, *, mode: IntegrationMode, legacy_v1_api: bool
) -> list[FieldError]:
    """Problems a submission has under ``mode`` (empty when it is acceptable)."""
    errors: list[FieldError] = []
    if api_version == "v1" and not legacy_v1_api:
        errors.append(
            FieldError(
                path="$.type", reason="the legacy v1 API is switched off (features.legacy_v1_api)"
            )
        )
    if mode == IntegrationMode.COMPATIBILITY:
        defaults = JobSubmission(job_type=spec.job_type)
        for name in V2_ONLY_FIELDS:
            if getattr(spec, name) != getattr(defaults, name):
                errors.append(
                    FieldError(
                        path=f"$.{name}",
                        reason="not available in compatibility mode (v1 semantics only)",
                    )
                )
    return errors


def uses_advanced_placement(spec: JobSubmission, mode: IntegrationMode) -> bool:
    """Whether ``spec`` is placed with the full scorer (else least-loaded) under ``mode``."""
    if mode == IntegrationMode.FULL:
        return True
    if mode == IntegrationMode.HYBRID:
        return spec.qos_requirements is not None or spec.routing_hints is not None
    return False
