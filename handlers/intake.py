"""Intake: validate submissions from the submit stream, de-duplicate, record them as queued.

Order of effects, each idempotent so that a crash at any line is repaired by redelivery:
tenant quota -> idempotency claim -> secret values (secrets bucket) -> job record (KV create,
secret values ``***``) -> ``job.queued`` event (de-duplicated id) -> verdict -> ack. When a
dispatcher runs in the same process and nothing waits ahead, intake hands it the job first
(``LocalPlacer.place_new``): it claims a runner slot and creates the record already dispatched,
so the job skips the queued record, the event round trip and a second write.

Refusals: an invalid submission and one JetStream has no room for are dead-lettered (secret
values redacted), one over its tenant's queue quota is not; each gets a verdict and an
``intake.rejected`` event saying why.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import NoReturn

import anyio
import msgspec
import nats.errors
import nats.js.errors
from anyio.abc import TaskStatus
from nats.aio.msg import Msg

from schemas import (
    TERMINAL_STATES,
    FieldError,
    IntakeRejected,
    JobDuplicate,
    JobState,
    JobSubmission,
    Refusal,
    SubmitVerdict,
)
from valkyrie import (
    REPLY_TO_HEADER,
    REQUESTED_BY_HEADER,
    GiveUp,
    HandlerContext,
    SchemaError,
    delivery_count,
    headers_of,
)
from valkyrie.bus import (
    ANY_DECODER,
    JOB_DECODER,
    encode,
    get_versioned,
    kv_create,
    now_ms,
    storage_full,
)
from valkyrie.domain.identity import reply_allowed, requester
from valkyrie.domain.intake import (
    idempotency_token,
    job_id_for,
    parse_submission,
    queue_quota_error,
    queued_record,
)
from valkyrie.domain.modes import check_intake_mode
from valkyrie.domain.scheduling import tenant_of
from valkyrie.domain.secrets import redact_body
from valkyrie.runtime import BucketRoom, HandlerBase, SecretStore

__all__ = ["IntakeWorker", "create"]

#: what a job record adds to its submission's size, about (ids, states, instants, envelope)
RECORD_OVERHEAD = 512


class IntakeWorker(HandlerBase):
    """Consumes ``<prefix>.jobs.submit[.<identity>]`` through the durable consumer ``intake``.

    The submitter is the identity the subject carries (NATS permissions let each identity
    publish only its own); its verdict goes to ``Valkyrie-Reply-To`` only inside that
    identity's inbox.
    """

    def __init__(self, ctx: HandlerContext) -> None:
        super().__init__(ctx)
        self._source = ""
        self._secrets = SecretStore(ctx.bus)

    async def run(
        self, stop: anyio.Event, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Consume submissions until ``stop`` is set."""
        bus = self._bus
        self._jobs = await bus.kv("jobs")
        self._idem = await bus.kv("idempotency")
        self._ledger = await self._ctx.views.queue_ledger()
        self._room = BucketRoom(
            bus, "jobs", lambda: self._ctx.config.current.limits.job_store_reserve
        )
        info = await bus.js.stream_info(bus.names.stream("submit"))
        created = str(getattr(info, "created", "") or "")
        # Ids derive from (stream incarnation, sequence): a recreated stream cannot reuse old ids.
        self._source = hashlib.sha256(f"{info.config.name}:{created}".encode()).hexdigest()[:12]
        await self.consume(
            stop,
            stream="submit",
            filter_subject=bus.names.submissions(),
            handle=self.handle,
            redact=redact_body,
            task_status=task_status,
        )

    async def _reply(self, reply_to: str | None, verdict: SubmitVerdict) -> None:
        if not reply_to:
            return
        try:
            await self._bus.nc.publish(reply_to, encode(verdict))
        except (nats.errors.Error, ValueError, TypeError):
            pass  # the verdict is also an event; a bad reply subject must not fail the job

    async def _refuse(
        self, reply_to: str | None, seq: int, errors: list[FieldError], refusal: Refusal
    ) -> None:
        rejection = f"{self._source}-{seq}"
        await self._events.emit(
            IntakeRejected(subject_id=rejection, errors=errors, stream_seq=seq, refusal=refusal)
        )
        await self._reply(reply_to, SubmitVerdict(accepted=False, errors=errors, refusal=refusal))
        self._ctx.metrics.jobs.labels(self.name, "rejected").inc()

    async def handle(self, msg: Msg) -> None:  # noqa: C901, PLR0915 - split once #15 lands
        """Process one submission."""
        now = now_ms()
        headers = headers_of(msg)
        identity = self._bus.names.sender(msg.subject, self._bus.names.submit)
        reply_to = headers.get(REPLY_TO_HEADER)
        if reply_to is not None and not reply_allowed(reply_to, identity):
            reply_to = None  # not the sender's inbox: the event says what happened instead
        seq = int(msg.metadata.sequence.stream)
        try:
            parsed = parse_submission(
                msg.data,
                received_at_ms=now,
                max_bytes=self._ctx.config.current.limits.submission_max_bytes,
                max_metadata_entries=self._ctx.config.current.limits.max_metadata_entries,
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
            await self._refuse(reply_to, seq, list(e.errors), "invalid")
            raise GiveUp(f"invalid submission: {e}", errors=e.errors) from e

        job_id = job_id_for(parsed.spec, source=f"{self._source}-{seq}")
        token = idempotency_token(parsed.spec, headers.get("Nats-Msg-Id"))
        # a redelivery may be of a job taken in already (the quota counts it, the store holds
        # it): never refuse it for either
        if delivery_count(msg) == 1:
            over = await self._over_quota(parsed.spec)
            full = None if over is not None else await self._room.full()
            # a resubmission of a job taken in already is answered as the duplicate it is
            if (over or full) is not None and not await self._taken_in(job_id, token):
                if over is not None:
                    await self._refuse(reply_to, seq, [over], "quota")
                    return  # not dead-lettered: its sender submits again later
                assert full is not None
                await self._no_room(full, job_id, None, False, reply_to, seq)
        claimed = stored = False  # what to undo if JetStream has no room for the job
        try:
            if token is not None:
                try:
                    await kv_create(self._idem, token, job_id.encode())
                except nats.js.errors.KeyWrongLastSequenceError:
                    first = (await self._idem.get(token)).value or b""
                    if first.decode() != job_id:
                        await self._duplicate(first.decode(), reply_to, seq)
                        return
                claimed = True
            if parsed.spec.secret_env:
                # before the record: a dispatcher may place the job as soon as that exists
                stored = await self._secrets.store(job_id, parsed.spec.secret_env)
        except nats.errors.Error as e:
            if not storage_full(e):
                raise
            await self._no_room(
                _detail(e), job_id, token if claimed else None, stored, reply_to, seq
            )

        record = queued_record(
            job_id,
            parsed,
            now_ms=now,
            source_seq=seq,
            submitted_by=requester(identity, headers.get(REQUESTED_BY_HEADER)),
        )
        # about what the record takes in the jobs bucket: the body and what a record adds
        self._room.took(len(msg.data) + RECORD_OVERHEAD)
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
            ours = existing.source_seq == seq
            if stored and (not ours or existing.state in TERMINAL_STATES):
                await self._secrets.forget(job_id)  # not the secrets of a job that will run
            if not ours:
                await self._duplicate(job_id, reply_to, seq)
                return
            # our own earlier attempt: finish its remaining steps
            if existing.attempt == 0:
                record, revision = existing, int(entry.revision or 0)
            else:
                # placed since (perhaps by a placer that died before announcing it): the queued
                # event says so, and is a no-op if it was stored before
                record = msgspec.structs.replace(record, submitted_at_ms=existing.submitted_at_ms)
                placed_attempt = existing.attempt
        except nats.errors.Error as e:
            if not storage_full(e):
                raise
            # the job does not exist: whatever secret values are kept under its id go too
            secrets = stored or bool(parsed.spec.secret_env)
            await self._no_room(
                _detail(e), job_id, token if claimed else None, secrets, reply_to, seq
            )
        await self._ops.announce_queued(
            record, revision=revision, at_ms=record.submitted_at_ms, placed_attempt=placed_attempt
        )
        await self._accepted(job_id, parsed.warnings, reply_to)

    async def _over_quota(self, spec: JobSubmission) -> FieldError | None:
        """Why the tenant of ``spec`` may not queue another job now (``None``: it may)."""
        current = self._ctx.config.current
        limits, tenant_key = current.limits, current.scheduling.tenant_key
        if limits.max_queued_per_tenant is None and not limits.tenant_max_queued:
            return None
        tenant = tenant_of(spec, tenant_key)
        return queue_quota_error(
            spec,
            self._ledger.queued_of(tenant),
            tenant=tenant,
            tenant_key=tenant_key,
            limits=limits,
        )

    async def _taken_in(self, job_id: str, token: str | None) -> bool:
        """Whether this submission's idempotency token or job id is known already.

        Read only before a refusal, never on the way of a job that is taken in.
        """
        for kv, key in ((self._idem, token), (self._jobs, job_id)):
            if key is not None and await get_versioned(kv, key, ANY_DECODER) is not None:
                return True
        return False

    async def _no_room(
        self,
        detail: str,
        job_id: str,
        token: str | None,
        stored: bool,
        reply_to: str | None,
        seq: int,
    ) -> NoReturn:
        """Refuse a submission JetStream has no room for; dead-letter it (it can be replayed)."""
        # undo what was taken: the job does not exist, so its key and secrets must not either
        if token is not None:
            await self._idem.delete(token)
        if stored:
            await self._secrets.forget(job_id)
        error = FieldError(
            path="$",
            reason=f"JetStream is full ({detail}): nothing was stored; submit again once jobs "
            "have ended or the limits are raised (docs/operations.md#storage-limits)",
        )
        await self._refuse(reply_to, seq, [error], "storage_full")
        raise GiveUp(f"refused: {error.reason}", errors=[error])

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

    async def _duplicate(self, first_id: str, reply_to: str | None, seq: int) -> None:
        await self._events.emit(
            JobDuplicate(subject_id=first_id, stream_seq=seq, stream_id=self._source)
        )
        self._ctx.metrics.jobs.labels(self.name, "duplicate").inc()
        await self._reply(reply_to, SubmitVerdict(accepted=True, job_id=first_id, duplicate=True))


def _detail(e: nats.errors.Error) -> str:
    return str(getattr(e, "description", None) or repr(e))


def create(ctx: HandlerContext) -> IntakeWorker:
    """Entry point: build the intake worker."""
    return IntakeWorker(ctx)
