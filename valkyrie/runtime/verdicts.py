"""Answering submissions: the verdict to the submitter's inbox, and every refusal as an event.

A submitter that waits gets a :class:`~schemas.SubmitVerdict` on its reply subject; one that does
not (or whose reply subject is not its own inbox) learns a refusal from the ``intake.rejected``
event, which is therefore emitted for every refusal, before the verdict.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import nats.errors

from schemas import FieldError, IntakeRejected, JobState, Refusal, SubmitVerdict
from valkyrie.bus.codec import encode
from valkyrie.bus.connection import Bus
from valkyrie.bus.events import EventPublisher

__all__ = ["SubmitVerdicts"]


class SubmitVerdicts:
    """Replies to the submissions of one intake worker; ``count`` tallies each outcome."""

    def __init__(self, bus: Bus, events: EventPublisher, count: Callable[[str], None]) -> None:
        self._bus = bus
        self._events = events
        self._count = count
        #: the submit stream's incarnation: a refusal's event id is ``<source>-<stream seq>``
        self.source = ""

    async def reply(self, reply_to: str | None, verdict: SubmitVerdict) -> None:
        """Send ``verdict`` to ``reply_to`` (nothing when there is none)."""
        if not reply_to:
            return
        try:
            await self._bus.nc.publish(reply_to, encode(verdict))
        except (nats.errors.Error, ValueError, TypeError):
            pass  # the verdict is also an event; a bad reply subject must not fail the job

    async def refuse(
        self,
        reply_to: str | None,
        seq: int,
        errors: list[FieldError],
        refusal: Refusal,
        *,
        job_id: str | None = None,
    ) -> None:
        """Answer and announce a refusal; ``job_id`` names the job a ``conflict`` collides with."""
        rejection = f"{self.source}-{seq}"
        await self._events.emit(
            IntakeRejected(subject_id=rejection, errors=errors, stream_seq=seq, refusal=refusal)
        )
        verdict = SubmitVerdict(
            accepted=False,
            job_id=job_id,
            duplicate=refusal == "conflict",
            errors=errors,
            refusal=refusal,
        )
        await self.reply(reply_to, verdict)
        self._count("rejected")

    async def accepted(
        self, reply_to: str | None, job_id: str, warnings: Sequence[FieldError]
    ) -> None:
        """Count a job taken in and tell its submitter."""
        self._count("queued")
        await self.reply(
            reply_to,
            SubmitVerdict(
                accepted=True, job_id=job_id, state=JobState.QUEUED, warnings=list(warnings)
            ),
        )

    async def duplicate(self, reply_to: str | None, job_id: str, state: JobState | None) -> None:
        """Tell a submitter its submission repeats job ``job_id`` (``state``: ``None`` if gone)."""
        await self.reply(
            reply_to, SubmitVerdict(accepted=True, job_id=job_id, duplicate=True, state=state)
        )
