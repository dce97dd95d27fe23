"""Intake: validate submissions from the submit stream, de-duplicate, record them as queued.

Order of effects, each idempotent so that a crash at any line is repaired by redelivery:
idempotency claim -> job record (KV create) -> ``job.queued`` event (de-duplicated id) -> verdict
-> ack. When a dispatcher runs in the same process and nothing waits ahead, intake hands it the
job first (``LocalPlacer.place_new``): it claims a runner slot and creates the record already
dispatched, so the job skips the queued record, the event round trip and a second write.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import anyio
import msgspec
import nats.errors
import nats.js.errors
from anyio.abc import TaskStatus
from nats.aio.msg import Msg

from schemas import (
    FieldError,
    IntakeRejected,
    JobDuplicate,
    JobRecord,
    JobState,
    SubmitVerdict,
)
from valkyrie import (
    REPLY_TO_HEADER,
    GiveUp,
    HandlerContext,
    SchemaError,
    headers_of,
)
from valkyrie.bus import JOB_DECODER, encode, kv_create, now_ms
from valkyrie.client import STRICT_HEADER
from valkyrie.domain.intake import (
    ParsedSubmission,
    RepeatedBy,
    conflict_error,
    idempotency_token,
    job_id_for,
    parse_submission,
    queued_record,
    read_token,
    token_value,
)
from valkyrie.domain.modes import check_intake_mode
from valkyrie.runtime import HandlerBase

__all__ = ["IntakeWorker", "create"]


class IntakeWorker(HandlerBase):
    """Consumes ``<prefix>.jobs.submit`` through the durable consumer ``intake``."""

    def __init__(self, ctx: HandlerContext) -> None:
        super().__init__(ctx)
        self._source = ""

    async def run(
        self, stop: anyio.Event, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Consume submissions until ``stop`` is set."""
        bus = self._bus
        self._jobs = await bus.kv("jobs")
        self._idem = await bus.kv("idempotency")
        info = await bus.js.stream_info(bus.names.stream("submit"))
        created = str(getattr(info, "created", "") or "")
        # Ids derive from (stream incarnation, sequence): a recreated stream cannot reuse old ids.
        self._source = hashlib.sha256(f"{info.config.name}:{created}".encode()).hexdigest()[:12]
        await self.consume(
            stop,
            stream="submit",
            filter_subject=bus.names.submit,
            handle=self.handle,
            task_status=task_status,
        )

    async def _reply(self, reply_to: str | None, verdict: SubmitVerdict) -> None:
        if not reply_to:
            return
        try:
            await self._bus.nc.publish(reply_to, encode(verdict))
        except (nats.errors.Error, ValueError, TypeError):
            pass  # the verdict is also an event; a bad reply subject must not fail the job

    async def handle(self, msg: Msg) -> None:
        """Process one submission."""
        now = now_ms()
        headers = headers_of(msg)
        reply_to = headers.get(REPLY_TO_HEADER)
        seq = int(msg.metadata.sequence.stream)
        try:
            parsed = parse_submission(
                msg.data,
                received_at_ms=now,
                max_bytes=self._ctx.config.current.limits.submission_max_bytes,
                max_metadata_entries=self._ctx.config.current.limits.max_metadata_entries,
                strict=headers.get(STRICT_HEADER, "").strip().lower() in ("1", "true", "yes"),
            )
            current = self._ctx.config.current
            mode_errors = check_intake_mode(
                parsed.spec,
                parsed.api_version,
                mode=current.mode,
                legacy_v1_api=current.features.legacy_v1_api,
            )
            if mode_errors:
                raise SchemaError(mode_errors)
        except SchemaError as e:
            await self._reject(SubmitVerdict(accepted=False, errors=e.errors), reply_to, seq)
            raise GiveUp(f"invalid submission: {e}", errors=e.errors) from e

        job_id = job_id_for(parsed.spec, source=f"{self._source}-{seq}")
        msg_id = headers.get("Nats-Msg-Id")
        token = idempotency_token(parsed.spec, msg_id)
        if token is not None:
            try:
                await kv_create(self._idem, token, token_value(job_id, parsed.digest))
            except nats.js.errors.KeyWrongLastSequenceError:
                first_id, first_digest = read_token((await self._idem.get(token)).value or b"")
                if first_id != job_id:
                    by: RepeatedBy = "idempotency_key" if parsed.spec.idempotency_key else "msg_id"
                    await self._duplicate(first_id, first_digest, by, parsed, reply_to, seq)
                    return

        record = queued_record(job_id, parsed, now_ms=now, source_seq=seq)
        placer = self._ctx.views.placer
        if placer is not None and await placer.place_new(record):
            await self._accepted(job_id, parsed.warnings, reply_to)
            return
        revision: int | None = None
        placed_attempt: int | None = None
        try:
            revision = await kv_create(self._jobs, job_id, encode(record))
        except nats.js.errors.KeyWrongLastSequenceError:
            entry = await self._jobs.get(job_id)
            existing = JOB_DECODER.decode(entry.value or b"")
            if existing.source_seq != seq:
                await self._duplicate(
                    job_id, existing.request_sha256, "job_id", parsed, reply_to, seq, existing
                )
                return
            # our own earlier attempt: finish its remaining steps
            if existing.attempt == 0:
                record, revision = existing, int(entry.revision or 0)
            else:
                # placed since (perhaps by a placer that died before announcing it): the queued
                # event says so, and is a no-op if it was stored before
                record = msgspec.structs.replace(record, submitted_at_ms=existing.submitted_at_ms)
                placed_attempt = existing.attempt
        await self._ops.announce_queued(
            record, revision=revision, at_ms=record.submitted_at_ms, placed_attempt=placed_attempt
        )
        await self._accepted(job_id, parsed.warnings, reply_to)

    async def _accepted(
        self, job_id: str, warnings: Sequence[FieldError], reply_to: str | None
    ) -> None:
        self._ctx.metrics.jobs.labels(self.name, "queued").inc()
        await self._reply(
            reply_to,
            SubmitVerdict(
                accepted=True, job_id=job_id, state=JobState.QUEUED, warnings=list(warnings)
            ),
        )

    async def _reject(self, verdict: SubmitVerdict, reply_to: str | None, seq: int) -> None:
        rejection = f"{self._source}-{seq}"
        await self._events.emit(
            IntakeRejected(subject_id=rejection, errors=list(verdict.errors), stream_seq=seq)
        )
        await self._reply(reply_to, verdict)
        self._ctx.metrics.jobs.labels(self.name, "rejected").inc()

    async def _duplicate(
        self,
        first_id: str,
        first_digest: str | None,
        by: RepeatedBy,
        parsed: ParsedSubmission,
        reply_to: str | None,
        seq: int,
        first: JobRecord | None = None,
    ) -> None:
        """Answer a repeat of an earlier submission: its job, or a refusal if the body differs.

        A digest missing on either side (stored before digests were kept) cannot be compared:
        then the repeat is taken for a duplicate, as it always was.
        """
        if first_digest is not None and parsed.digest and first_digest != parsed.digest:
            errors = [conflict_error(first_id, by=by)]
            verdict = SubmitVerdict(accepted=False, job_id=first_id, duplicate=True, errors=errors)
            await self._reject(verdict, reply_to, seq)
            raise GiveUp(f"a different body reuses {by} of job {first_id}", errors=errors)
        await self._events.emit(
            JobDuplicate(subject_id=first_id, stream_seq=seq, stream_id=self._source)
        )
        self._ctx.metrics.jobs.labels(self.name, "duplicate").inc()
        if first is None:
            try:
                entry = await self._jobs.get(first_id)
                first = JOB_DECODER.decode(entry.value or b"")
            except (nats.js.errors.KeyNotFoundError, msgspec.DecodeError):
                first = None  # ended and removed since (limits.job_retention_s)
        await self._reply(
            reply_to,
            SubmitVerdict(
                accepted=True,
                job_id=first_id,
                duplicate=True,
                state=first.state if first is not None else None,
            ),
        )


def create(ctx: HandlerContext) -> IntakeWorker:
    """Entry point: build the intake worker."""
    return IntakeWorker(ctx)
