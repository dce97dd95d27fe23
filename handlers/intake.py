"""Intake: validate submissions from the submit stream, de-duplicate, record them as queued.

Order of effects, each idempotent so that a crash at any line is repaired by redelivery:
tenant quota -> idempotency claim -> secret values (secrets bucket) -> job record (KV create,
secret values ``***``) -> ``job.queued`` event (de-duplicated id) -> verdict -> ack. When a
dispatcher runs in the same process and nothing waits ahead, intake hands it the job first
(``LocalPlacer.place_new``): it claims a runner slot and creates the record already dispatched,
so the job skips the queued record, the event round trip and a second write.

Refusals: an invalid submission, one that reuses an earlier job's idempotency key, Nats-Msg-Id
or job id with another body (``conflict``), and one JetStream has no room for are dead-lettered
(secret values redacted); one over its tenant's queue quota is not. Each gets a verdict and an
``intake.rejected`` event saying why.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from typing import NoReturn

import anyio
import msgspec
import nats.errors
import nats.js.errors
from anyio.abc import TaskStatus
from nats.aio.msg import Msg

from schemas import (
    TERMINAL_STATES,
    JobDuplicate,
    JobRecord,
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
from valkyrie.client import STRICT_HEADER
from valkyrie.domain.identity import reply_allowed, requester
from valkyrie.domain.intake import (
    ParsedSubmission,
    RepeatedBy,
    conflict_error,
    idempotency_token,
    job_id_for,
    parse_submission,
    queued_record,
    read_token,
    storage_full_error,
    token_value,
)
from valkyrie.domain.modes import check_intake_mode
from valkyrie.domain.secrets import redact_body
from valkyrie.runtime import Admission, HandlerBase, SecretStore, SubmitVerdicts

__all__ = ["IntakeWorker", "create"]


@dataclass(slots=True)
class _Submission:
    """One submission on its way in: what it is, where it came from, what it has taken."""

    parsed: ParsedSubmission
    job_id: str
    token: str | None
    seq: int
    reply_to: str | None
    #: the idempotency key is this submission's (to give back if the job cannot be stored)
    claimed: bool = False
    #: its secret values are in the secrets bucket
    stored: bool = False


class IntakeWorker(HandlerBase):
    """Consumes ``<prefix>.jobs.submit[.<identity>]`` through the durable consumer ``intake``.

    The submitter is the identity the subject carries (NATS permissions let each identity
    publish only its own); its verdict goes to ``Valkyrie-Reply-To`` only inside that
    identity's inbox.
    """

    def __init__(self, ctx: HandlerContext) -> None:
        super().__init__(ctx)
        self._secrets = SecretStore(ctx.bus)
        self._verdicts = SubmitVerdicts(
            ctx.bus, self._events, lambda outcome: ctx.metrics.jobs.labels(self.name, outcome).inc()
        )

    async def run(
        self, stop: anyio.Event, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Consume submissions until ``stop`` is set."""
        bus = self._bus
        self._jobs = await bus.kv("jobs")
        self._idem = await bus.kv("idempotency")
        ledger = await self._ctx.views.queue_ledger()
        self._admission = Admission(bus, self._ctx.config, ledger)
        info = await bus.js.stream_info(bus.names.stream("submit"))
        created = str(getattr(info, "created", "") or "")
        # Ids derive from (stream incarnation, sequence): a recreated stream cannot reuse old ids.
        self._source = hashlib.sha256(f"{info.config.name}:{created}".encode()).hexdigest()[:12]
        self._verdicts.source = self._source
        await self.consume(
            stop,
            stream="submit",
            filter_subject=bus.names.submissions(),
            handle=self.handle,
            redact=redact_body,
            task_status=task_status,
        )

    async def handle(self, msg: Msg) -> None:
        """Process one submission: parse, admit, claim, record, announce, answer."""
        now = now_ms()
        headers = headers_of(msg)
        identity = self._bus.names.sender(msg.subject, self._bus.names.submit)
        reply_to = headers.get(REPLY_TO_HEADER)
        if reply_to is not None and not reply_allowed(reply_to, identity):
            reply_to = None  # not the sender's inbox: the event says what happened instead
        seq = int(msg.metadata.sequence.stream)
        parsed = await self._parse(msg.data, headers, now, reply_to, seq)
        sub = _Submission(
            parsed=parsed,
            job_id=job_id_for(parsed.spec, source=f"{self._source}-{seq}"),
            token=idempotency_token(parsed.spec, headers.get("Nats-Msg-Id")),
            seq=seq,
            reply_to=reply_to,
        )
        # a redelivery may be of a job taken in already (the quota counts it, the store holds
        # it): never refuse it for either
        if delivery_count(msg) == 1 and not await self._admitted(sub):
            return
        if not await self._claim(sub):
            return
        record = queued_record(
            sub.job_id,
            parsed,
            now_ms=now,
            source_seq=seq,
            submitted_by=requester(identity, headers.get(REQUESTED_BY_HEADER)),
        )
        self._admission.took(len(msg.data))
        placer = self._ctx.views.placer
        if placer is not None and await placer.place_new(record):
            await self._accepted(sub)
            return
        stored = await self._store(sub, record)
        if stored is None:
            return
        record, revision, placed_attempt = stored
        await self._ops.announce_queued(
            record, revision=revision, at_ms=record.submitted_at_ms, placed_attempt=placed_attempt
        )
        await self._accepted(sub)

    async def _parse(
        self, data: bytes, headers: dict[str, str], now: int, reply_to: str | None, seq: int
    ) -> ParsedSubmission:
        """The submission, checked against the contract and the mode; else refused (GiveUp)."""
        current = self._ctx.config.current
        try:
            parsed = parse_submission(
                data,
                received_at_ms=now,
                max_bytes=current.limits.submission_max_bytes,
                max_metadata_entries=current.limits.max_metadata_entries,
                strict=headers.get(STRICT_HEADER, "").strip().lower() in ("1", "true", "yes"),
            )
            mode_errors = check_intake_mode(
                parsed.spec,
                parsed.api_version,
                mode=current.mode,
                legacy_v1_api=current.features.legacy_v1_api,
            )
            if mode_errors:
                raise SchemaError(mode_errors)
        except SchemaError as e:
            await self._verdicts.refuse(reply_to, seq, list(e.errors), "invalid")
            raise GiveUp(f"invalid submission: {e}", errors=e.errors) from e
        return parsed

    async def _admitted(self, sub: _Submission) -> bool:
        """Whether the tenant's quota and JetStream's room let the job in (first delivery only).

        A refusal for the quota answers and returns ``False`` (not dead-lettered: its sender
        submits again later); one for room raises GiveUp. A resubmission of a job taken in
        already is never refused: it is answered as the duplicate it is.
        """
        refused = await self._admission.refused(sub.parsed.spec)
        if refused is None or await self._taken_in(sub.job_id, sub.token):
            return True
        if refused.over_quota is not None:
            await self._verdicts.refuse(sub.reply_to, sub.seq, [refused.over_quota], "quota")
            return False
        assert refused.full is not None
        await self._no_room(sub, refused.full, secrets=False)

    async def _claim(self, sub: _Submission) -> bool:
        """Claim the idempotency key and keep the secret values; ``False``: a duplicate, answered.

        The secrets go before the record: a dispatcher may place the job as soon as that exists.
        """
        try:
            if sub.token is not None:
                value = token_value(sub.job_id, sub.parsed.digest)
                try:
                    await kv_create(self._idem, sub.token, value)
                except nats.js.errors.KeyWrongLastSequenceError:
                    entry = await self._idem.get(sub.token)
                    first_id, first_digest = read_token(entry.value or b"")
                    if first_id != sub.job_id:
                        key = sub.parsed.spec.idempotency_key
                        by: RepeatedBy = "idempotency_key" if key else "msg_id"
                        await self._duplicate(sub, first_id, first_digest, by)
                        return False
                sub.claimed = True
            if sub.parsed.spec.secret_env:
                sub.stored = await self._secrets.store(sub.job_id, sub.parsed.spec.secret_env)
        except nats.errors.Error as e:
            if not storage_full(e):
                raise
            await self._no_room(sub, _detail(e), secrets=sub.stored)
        return True

    async def _store(
        self, sub: _Submission, record: JobRecord
    ) -> tuple[JobRecord, int | None, int | None] | None:
        """Create the job record: ``(record, revision, placed attempt)`` to announce.

        ``None``: the job id was another submission's (answered as its duplicate). Finding its
        own earlier write (a redelivery), it finishes that attempt's remaining steps.
        """
        try:
            revision = await kv_create(self._jobs, sub.job_id, encode(record))
        except nats.js.errors.KeyWrongLastSequenceError:
            entry = await self._jobs.get(sub.job_id)
            existing = JOB_DECODER.decode(entry.value or b"")
            ours = existing.source_seq == sub.seq
            if sub.stored and (not ours or existing.state in TERMINAL_STATES):
                await self._secrets.forget(sub.job_id)  # not the secrets of a job that will run
            if not ours:
                await self._duplicate(sub, sub.job_id, existing.request_sha256, "job_id", existing)
                return None
            if existing.attempt == 0:
                return existing, int(entry.revision or 0), None
            # placed since (perhaps by a placer that died before announcing it): the queued
            # event says so, and is a no-op if it was stored before
            record = msgspec.structs.replace(record, submitted_at_ms=existing.submitted_at_ms)
            return record, None, existing.attempt
        except nats.errors.Error as e:
            if not storage_full(e):
                raise
            # the job does not exist: whatever secret values are kept under its id go too
            await self._no_room(
                sub, _detail(e), secrets=sub.stored or bool(sub.parsed.spec.secret_env)
            )
        return record, revision, None

    async def _taken_in(self, job_id: str, token: str | None) -> bool:
        """Whether this submission's idempotency token or job id is known already.

        Read only before a refusal, never on the way of a job that is taken in.
        """
        for kv, key in ((self._idem, token), (self._jobs, job_id)):
            if key is not None and await get_versioned(kv, key, ANY_DECODER) is not None:
                return True
        return False

    async def _no_room(self, sub: _Submission, detail: str, *, secrets: bool) -> NoReturn:
        """Refuse a submission JetStream has no room for; dead-letter it (it can be replayed)."""
        # undo what was taken: the job does not exist, so its key and secrets must not either
        if sub.claimed and sub.token is not None:
            await self._idem.delete(sub.token)
        if secrets:
            await self._secrets.forget(sub.job_id)
        error = storage_full_error(detail)
        await self._verdicts.refuse(sub.reply_to, sub.seq, [error], "storage_full")
        raise GiveUp(f"refused: {error.reason}", errors=[error])

    async def _accepted(self, sub: _Submission) -> None:
        await self._verdicts.accepted(sub.reply_to, sub.job_id, sub.parsed.warnings)

    async def _duplicate(
        self,
        sub: _Submission,
        first_id: str,
        first_digest: str | None,
        by: RepeatedBy,
        first: JobRecord | None = None,
    ) -> None:
        """Answer a repeat of an earlier submission: its job, or a refusal if the body differs.

        A digest missing on either side (stored before digests were kept) cannot be compared:
        then the repeat is taken for a duplicate, as it always was.
        """
        digest = sub.parsed.digest
        if first_digest is not None and digest and first_digest != digest:
            errors = [conflict_error(first_id, by=by)]
            await self._verdicts.refuse(sub.reply_to, sub.seq, errors, "conflict", job_id=first_id)
            raise GiveUp(f"a different body reuses the {by} of job {first_id}", errors=errors)
        await self._events.emit(
            JobDuplicate(subject_id=first_id, stream_seq=sub.seq, stream_id=self._source)
        )
        self._ctx.metrics.jobs.labels(self.name, "duplicate").inc()
        if first is None:
            with contextlib.suppress(msgspec.DecodeError):
                found = await get_versioned(self._jobs, first_id, JOB_DECODER)
                first = found.value if found is not None else None  # None: ended, removed
        state = first.state if first is not None else None
        await self._verdicts.duplicate(sub.reply_to, first_id, state)


def _detail(e: nats.errors.Error) -> str:
    return str(getattr(e, "description", None) or repr(e))


def create(ctx: HandlerContext) -> IntakeWorker:
    """Entry point: build the intake worker."""
    return IntakeWorker(ctx)
