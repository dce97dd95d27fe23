"""Errors of the runner SDK, under Valkyrie's :class:`~valkyrie.ValkyrieError` tree."""

from __future__ import annotations

from schemas import FieldError
from valkyrie.errors import ValkyrieError

__all__ = ["JobError", "RegistrationRejected"]


class RegistrationRejected(ValkyrieError):
    """The registry refused the runner's registration; ``errors`` says why, field by field."""

    def __init__(self, runner_id: str, errors: list[FieldError]) -> None:
        self.runner_id = runner_id
        self.errors = errors
        reasons = "; ".join(f"{e.path}: {e.reason}" for e in errors) or "no reason given"
        super().__init__(f"registration of runner {runner_id!r} was rejected: {reasons}")


class JobError(ValkyrieError):
    """Raised by a job handler when the job could not be run at all (outcome ``error``).

    A job that ran and failed should return a result with a non-zero exit code instead.
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)
