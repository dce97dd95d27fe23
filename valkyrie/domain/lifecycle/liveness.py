"""The liveness judgement: which runners are lost, and whether to judge at all (pure).

A runner is lost when nothing was heard from it for longer than ``dispatch.runner_lost_after_ms``.
"Heard" is the latest of: the heartbeat the judging process received itself, the heartbeat time
on the record (written by the registry, maybe in another process), and the instant the judge
started listening. The last is a grace period, so a restarted supervisor, or one that was
disconnected, does not declare every runner lost at once.

Silence the judge caused itself is not a runner's fault, so it judges nobody after a pass that
came late (the process was starved) and, before calling anyone silent, makes sure it has read
every heartbeat already sent to it (:attr:`Judgement.catch_up`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from schemas import RunnerRecord, RunnerState

__all__ = [
    "LATE_PASS_SLACK_S",
    "Judgement",
    "LivenessFacts",
    "judge_liveness",
    "last_seen",
    "pass_on_time",
]

#: how late a pass may start before it counts as starved, beyond twice the interval
LATE_PASS_SLACK_S = 0.5


def last_seen(record: RunnerRecord, *, heard_ms: int | None, listening_since_ms: int) -> int:
    """When the runner was last heard of, as far as the judge can tell (see the module doc)."""
    return max(heard_ms or 0, record.last_heartbeat_at_ms, listening_since_ms)


def pass_on_time(since_last_pass_s: float, interval_ms: int) -> bool:
    """Whether a pass started on time: at most two intervals (plus slack) after the last one ended.

    Measured from the end of the previous pass: a pass made long by its own take-backs is not
    starvation.
    """
    return since_last_pass_s <= 2 * interval_ms / 1000 + LATE_PASS_SLACK_S


@dataclass(frozen=True, slots=True)
class LivenessFacts:
    """What the judge knows besides the records."""

    now_ms: int
    lost_after_ms: int
    #: the grace period: nobody counts as silent from before this instant
    listening_since_ms: int
    #: runner id -> when the judge itself last heard a heartbeat of it
    heard: Mapping[str, int] = field(default_factory=dict)
    #: this pass is not late (see :func:`pass_on_time`)
    on_time: bool = True
    #: every heartbeat sent to the judge before now has been read; ``None``: not checked yet
    caught_up: bool | None = None


@dataclass(frozen=True, slots=True)
class Judgement:
    """The verdict of one pass."""

    #: runner id -> last seen, of every runner to mark lost now
    lost: Mapping[str, int] = field(default_factory=dict)
    #: someone looks silent: read the waiting heartbeats, then judge again with ``caught_up``
    catch_up: bool = False


def judge_liveness(records: Mapping[str, RunnerRecord], facts: LivenessFacts) -> Judgement:
    """Which runners (not offline already) are lost, given what the judge knows.

    Nobody is judged in a late pass, nor before the judge has caught up with its heartbeats:
    skipping a pass whenever one heartbeat waited unread held a busy process's judgement back by
    seconds, so the judge asks to catch up (:attr:`Judgement.catch_up`) only when someone looks
    silent, and then judges on what it read.
    """
    if not facts.on_time:
        return Judgement()
    silent = {
        runner_id: seen
        for runner_id, record in records.items()
        if record.state != RunnerState.OFFLINE
        and facts.now_ms
        - (
            seen := last_seen(
                record,
                heard_ms=facts.heard.get(runner_id),
                listening_since_ms=facts.listening_since_ms,
            )
        )
        > facts.lost_after_ms
    }
    if not silent:
        return Judgement()
    if facts.caught_up is None:
        return Judgement(catch_up=True)
    return Judgement(lost=silent if facts.caught_up else {})
