"""Runner records as pure functions: registration, heartbeats, drain, loss, leaving, and slots.

Every change to a runner record is one of these transitions, applied by a handler inside a
compare-and-set (so a transition may run more than once on successive versions of the record and
must depend on nothing but its arguments). ``state`` is derived by :func:`runner_state` after each
change, except ``offline``, which only the supervisor's liveness judgement sets
(:mod:`valkyrie.domain.lifecycle.liveness`) and only a heartbeat or a re-registration clears.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import msgspec

from schemas import (
    FieldError,
    JobRecord,
    RegistrationVerdict,
    RunnerHeartbeat,
    RunnerRecord,
    RunnerRegistration,
    RunnerState,
    RunnerStats,
)
from valkyrie.domain.lifecycle.jobs import is_on

__all__ = [
    "DEREGISTER_RETRY_MS",
    "HEARTBEAT_PERSIST_MS",
    "Refusal",
    "Reregistered",
    "Touched",
    "assign_slot",
    "deregistration_refusal",
    "from_other_session",
    "heartbeat_needs_write",
    "holding_refusal",
    "mark_lost",
    "new_runner",
    "not_held",
    "refused",
    "release_slot",
    "reregister",
    "runner_state",
    "set_drain",
    "should_forget",
    "touch",
]

#: how often a live runner's record is rewritten just to refresh its shown heartbeat time
HEARTBEAT_PERSIST_MS = 5000
#: when a runner that may not leave yet (slot releases still being written) should ask again
DEREGISTER_RETRY_MS = 200
STATS_WINDOW = 50  # success rate and accept latency are moving averages over about this many jobs


def runner_state(
    record: RunnerRecord, *, now_ms: int | None = None, lost_after_ms: int | None = None
) -> RunnerState:
    """The state a runner record implies (offline is decided by the supervisor's liveness check)."""
    if record.state == RunnerState.OFFLINE:
        return RunnerState.OFFLINE
    if (
        now_ms is not None
        and lost_after_ms is not None
        and now_ms - record.last_heartbeat_at_ms > lost_after_ms
    ):
        return RunnerState.OFFLINE
    if record.drain_requested:
        return RunnerState.DRAINING
    if len(record.assigned_jobs) >= record.registration.max_concurrent_jobs:
        return RunnerState.BUSY
    return RunnerState.ACTIVE


def _settled(record: RunnerRecord) -> RunnerRecord:
    return msgspec.structs.replace(record, state=runner_state(record))


# -- registration -----------------------------------------------------------------------------------


def new_runner(registration: RunnerRegistration, *, now_ms: int) -> RunnerRecord:
    """The record of a runner registering for the first time."""
    return RunnerRecord(
        registration=registration,
        state=RunnerState.ACTIVE,
        registered_at_ms=now_ms,
        last_heartbeat_at_ms=now_ms,
    )


@dataclass(frozen=True, slots=True)
class Reregistered:
    """A known runner registered again: its new record, and the jobs it must abandon."""

    record: RunnerRecord
    #: job id -> attempt: everything a runner held before it restarted is gone with that process
    abandon: Mapping[str, int] = field(default_factory=dict)


def reregister(old: RunnerRecord, registration: RunnerRegistration, *, now_ms: int) -> Reregistered:
    """A known runner registers again: the same session refreshes, a new one is a restart.

    The record keeps its slots either way: those of a restarted runner are freed as its jobs are
    taken back, one compare-and-set per job, like any other take-back.
    """
    same_session = (
        old.registration.session_id is not None
        and old.registration.session_id == registration.session_id
    )
    updated = msgspec.structs.replace(
        old, registration=registration, last_heartbeat_at_ms=now_ms, state=RunnerState.ACTIVE
    )
    abandon = {} if same_session else dict(old.assigned_jobs)
    return Reregistered(_settled(updated), abandon)


# -- heartbeats -------------------------------------------------------------------------------------


def from_other_session(record: RunnerRecord, session_id: str | None) -> bool:
    """A heartbeat (or request) from a previous incarnation of the runner the record describes."""
    known = record.registration.session_id
    return bool(known and session_id and known != session_id)


def heartbeat_needs_write(record: RunnerRecord, *, now_ms: int) -> bool:
    """Whether a heartbeat must be written to the record, or only confirms what it says.

    Liveness is judged from the heartbeats as they arrive (the supervisor hears them all), so the
    record is rewritten only when something changes (an offline runner is back) or, at most every
    :data:`HEARTBEAT_PERSIST_MS`, to refresh the heartbeat time people see.
    """
    return (
        record.state == RunnerState.OFFLINE
        or now_ms - record.last_heartbeat_at_ms >= HEARTBEAT_PERSIST_MS
    )


@dataclass(frozen=True, slots=True)
class Touched:
    """A heartbeat folded into a record; ``back_online`` when the runner had been marked lost."""

    record: RunnerRecord
    back_online: bool = False


def touch(old: RunnerRecord, beat: RunnerHeartbeat, *, now_ms: int) -> Touched | None:
    """The record after a heartbeat; ``None`` for a heartbeat of a previous session."""
    if from_other_session(old, beat.session_id):
        return None
    back = old.state == RunnerState.OFFLINE
    updated = msgspec.structs.replace(
        old,
        last_heartbeat_at_ms=max(now_ms, old.last_heartbeat_at_ms),
        load=beat.load,
        state=RunnerState.ACTIVE if back else old.state,
    )
    return Touched(_settled(updated), back_online=back)


def not_held(beat: RunnerHeartbeat, record: RunnerRecord) -> list[str]:
    """Jobs the runner says it runs but no longer holds (taken back meanwhile): to abandon."""
    return [job_id for job_id in beat.running_jobs if job_id not in record.assigned_jobs]


# -- drain, loss, leaving -------------------------------------------------------------------------


def set_drain(record: RunnerRecord, draining: bool) -> RunnerRecord | None:
    """Drain (no new work) or undrain a runner; ``None`` when it already is so."""
    if record.drain_requested == draining:
        return None
    return _settled(msgspec.structs.replace(record, drain_requested=draining))


def mark_lost(record: RunnerRecord, *, last_seen_ms: int) -> RunnerRecord | None:
    """Mark a runner silent since ``last_seen_ms`` offline.

    ``None`` when it already is, or when a heartbeat newer than the judgement was recorded
    meanwhile (the runner is not silent after all).
    """
    if record.state == RunnerState.OFFLINE or record.last_heartbeat_at_ms > last_seen_ms:
        return None
    return msgspec.structs.replace(record, state=RunnerState.OFFLINE)


def should_forget(
    record: RunnerRecord, *, last_seen_ms: int, now_ms: int, retention_ms: int
) -> bool:
    """Whether an offline runner holding nothing has been gone long enough to remove its record."""
    return (
        record.state == RunnerState.OFFLINE
        and not record.assigned_jobs
        and now_ms - last_seen_ms > retention_ms
    )


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request about a runner is refused, and when asking again may succeed."""

    reason: str
    retry_after_ms: int | None = None


def refused(
    reason: str,
    *,
    path: str = "$",
    runner_id: str | None = None,
    retry_after_ms: int | None = None,
) -> RegistrationVerdict:
    """The registry's answer refusing a request, for ``reason`` about the field at ``path``."""
    return RegistrationVerdict(
        accepted=False,
        runner_id=runner_id,
        errors=[FieldError(path=path, reason=reason)],
        retry_after_ms=retry_after_ms,
    )


def deregistration_refusal(
    record: RunnerRecord | None, runner_id: str, session_id: object
) -> Refusal | None:
    """Whether the runner may leave as far as its identity goes (``None``: it may).

    Only the session that registered last may deregister; an older one is told no.
    """
    if record is None:
        return Refusal(f"no runner {runner_id!r}")
    if record.registration.session_id not in (None, session_id):
        return Refusal("a newer session of this runner is registered")
    return None


def holding_refusal(
    slots: Mapping[str, int], runner_id: str, jobs: Mapping[str, JobRecord | None]
) -> Refusal | None:
    """Whether the runner still holds jobs and so may not leave yet (``None``: it may).

    ``jobs`` holds the current record of each job in ``slots`` (``None``: gone). A slot whose job
    ended, or went to another runner or attempt, does not count: it is a release still being
    written or an orphan the supervisor has not freed yet; it goes with the record and must not
    keep a runner that leaves from deregistering (it would be reported lost instead). A slot
    whose job is missing from ``jobs`` counts as held.
    """
    held = [
        job_id
        for job_id, attempt in slots.items()
        if job_id not in jobs or is_on(jobs[job_id], runner_id, attempt)
    ]
    if not held:
        return None
    # a runner that finished its last jobs leaves before their slot releases are all written
    return Refusal(f"it still holds {len(held)} job(s)", DEREGISTER_RETRY_MS)


# -- slots ------------------------------------------------------------------------------------------


def assign_slot(record: RunnerRecord, job_id: str, attempt: int) -> RunnerRecord | None:
    """Reserve a slot for ``job_id``; ``None`` when the runner cannot take it."""
    if job_id in record.assigned_jobs:
        return record if record.assigned_jobs[job_id] == attempt else None
    if record.state in (RunnerState.OFFLINE, RunnerState.DRAINING) or record.drain_requested:
        return None
    if len(record.assigned_jobs) >= record.registration.max_concurrent_jobs:
        return None
    return _settled(
        msgspec.structs.replace(record, assigned_jobs={**record.assigned_jobs, job_id: attempt})
    )


def release_slot(
    record: RunnerRecord,
    job_id: str,
    attempt: int | None = None,
    *,
    succeeded: bool | None = None,
    accept_latency_ms: float | None = None,
) -> RunnerRecord | None:
    """Free ``job_id``'s slot (only for ``attempt`` when given) and fold the outcome into stats.

    Returns ``None`` when there is nothing to change.
    """
    held = record.assigned_jobs.get(job_id)
    if held is None or (attempt is not None and held != attempt):
        return None
    assigned = {k: v for k, v in record.assigned_jobs.items() if k != job_id}
    stats = record.stats
    if succeeded is not None:
        alpha = 1.0 / STATS_WINDOW
        stats = RunnerStats(
            jobs_completed=stats.jobs_completed + (1 if succeeded else 0),
            jobs_failed=stats.jobs_failed + (0 if succeeded else 1),
            success_rate=(1 - alpha) * stats.success_rate + alpha * (1.0 if succeeded else 0.0),
            accept_latency_ms=(
                stats.accept_latency_ms
                if accept_latency_ms is None
                else (
                    accept_latency_ms
                    if stats.jobs_completed + stats.jobs_failed == 0
                    else (1 - alpha) * stats.accept_latency_ms + alpha * accept_latency_ms
                )
            ),
            recent_failures=0 if succeeded else stats.recent_failures + 1,
        )
    return _settled(msgspec.structs.replace(record, assigned_jobs=assigned, stats=stats))
