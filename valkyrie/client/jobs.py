"""The client API the CLI, the HTTP bridge and tests use: submit, read jobs, follow events."""

from __future__ import annotations

import contextlib
import datetime as dt
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import anyio
import msgspec
import nats.errors
import nats.js.errors
from nats.js.api import ConsumerConfig, DeliverPolicy

from schemas import (
    MAX_JSON_DEPTH,
    TERMINAL_STATES,
    Event,
    ExplainRequest,
    FieldError,
    JobExplanation,
    JobRecord,
    JobState,
    JobSubmission,
    SafeDecoder,
    SubmitVerdict,
    too_deep,
)
from valkyrie.bus.codec import (
    ANY_DECODER,
    CONFIG_REVISION_DECODER,
    EVENT_DECODER,
    JOB_DECODER,
    VERDICT_DECODER,
    encode,
    now_ms,
)
from valkyrie.bus.connection import Bus
from valkyrie.bus.kv import KvChange, get_versioned, watch_kv
from valkyrie.bus.snapshot import read_stored
from valkyrie.bus.storage import full_error, storage_full
from valkyrie.config.live import CONFIG_KEY, LiveConfig
from valkyrie.config.load import load_config
from valkyrie.config.model import LimitsConfig
from valkyrie.domain.identity import SUBMITTER_PREFIX
from valkyrie.domain.intake import (
    RepeatedBy,
    conflict_error,
    parse_submission,
    read_token,
    token_for,
)
from valkyrie.errors import BusError, NotFoundError, NoVerdictError, SchemaError

__all__ = ["REPLY_TO_HEADER", "REQUESTED_BY_HEADER", "STRICT_HEADER", "Client"]

#: Header naming the subject the intake handler sends its verdict to (inside the sender's inbox).
REPLY_TO_HEADER = "Valkyrie-Reply-To"
#: Header refining who submits (``admin:alice``; the gateway: ``http:<token name>``); intake
#: keeps it only as far as the subject's identity vouches for it (``domain.identity.requester``).
REQUESTED_BY_HEADER = "Valkyrie-Requested-By"
#: Header asking intake to refuse a submission with fields the contract does not know
#: (``true``); without it they are ignored with a warning each.
STRICT_HEADER = "Valkyrie-Strict"
#: how often a submitter, which may not watch buckets, reads a key it waits for
POLL_S = 0.1
_EXPLANATION = SafeDecoder(JobExplanation)
#: a record nests its submission two levels below the top, and bodies deeper than MAX_JSON_DEPTH
#: are refused: a record deeper than this was stored before that limit, and cannot be served
STORED_MAX_DEPTH = MAX_JSON_DEPTH + 8
#: after a first explain answer from a dispatcher not holding the queued job, how long to wait
#: for the holder's (each dispatcher only knows its own queue)
EXPLAIN_GRACE_S = 0.2


class Client:
    """High-level operations over a connected :class:`~valkyrie.Bus`.

    ``config`` is the process's live config, if it has one; the input limits intake applies are
    read from it (with the revision in force applied), else from the revision in force over the
    model's defaults.
    """

    def __init__(
        self, bus: Bus, *, config: LiveConfig | None = None, requested_by: str | None = None
    ) -> None:
        self.bus = bus
        self.config = config
        self.requested_by = requested_by
        self._defaults: LiveConfig | None = None
        # submitters may read keys but not watch (no consumers: docs/security.md): they poll
        self._poll = bus.identity is not None and bus.identity.startswith(SUBMITTER_PREFIX)

    async def limits(self) -> LimitsConfig:
        """The input limits in force (``limits``), as intake reads them from its live config."""
        live = self.config
        if live is None:
            live = self._defaults = self._defaults or LiveConfig(load_config(environ={}))
        kv = await self.bus.kv("config")
        current = await get_versioned(kv, CONFIG_KEY, CONFIG_REVISION_DECODER)
        if current is not None:
            live.apply(current.value)  # a no-op when ``live`` runs it already
        return live.current.limits

    async def submit(
        self,
        job: JobSubmission | dict[str, Any] | bytes,
        *,
        msg_id: str | None = None,
        wait_verdict: bool = True,
        timeout_s: float = 10.0,
        strict: bool = False,
    ) -> SubmitVerdict | None:
        """Publish a submission; with ``wait_verdict`` return the intake handler's verdict.

        With ``strict``, intake refuses fields the contract does not know instead of ignoring
        them with a warning (:data:`STRICT_HEADER`).

        The submission is durable once this returns (the stream acknowledged it), even when no
        intake handler runs; the verdict then arrives when one starts.

        Raises:
            NoVerdictError: it was stored, but no verdict came within ``timeout_s`` (do not
                submit it again without a message id or idempotency key: that makes a second job).
            StorageFullError: the submit stream is full (nothing was submitted: try again later).
            BusError: the stream did not store it (nothing was submitted: safe to try again).
        """
        body = job if isinstance(job, bytes) else encode(job)
        headers: dict[str, str] = {}
        if msg_id:
            headers["Nats-Msg-Id"] = msg_id
        if self.requested_by:
            headers[REQUESTED_BY_HEADER] = self.requested_by
        if strict:
            headers[STRICT_HEADER] = "true"
        nc = self.bus.nc
        sub = None
        if wait_verdict:
            inbox = nc.new_inbox()
            sub = await nc.subscribe(inbox, max_msgs=1)
            headers[REPLY_TO_HEADER] = inbox
        try:
            try:
                ack = await self.bus.js.publish(
                    self.bus.names.submit_as(self.bus.identity),
                    body,
                    headers=headers or None,
                    timeout=timeout_s,
                )
            except (nats.errors.Error, nats.js.errors.Error) as e:
                if storage_full(e):
                    raise full_error(e, "submission") from e
                raise BusError(f"submission not stored: {e!r}") from e
            if sub is None:
                return None
            if ack.duplicate:
                # The stream dropped it as a Nats-Msg-Id duplicate: no verdict will come, so answer
                # with the verdict the first submission got.
                try:
                    return await self._duplicate_verdict(body, msg_id, timeout_s)
                except (nats.errors.Error, nats.js.errors.Error) as e:
                    raise NoVerdictError(
                        f"duplicate of an earlier submission (Nats-Msg-Id {msg_id!r}) whose "
                        f"verdict could not be read: {e!r}",
                        seq=ack.seq,
                    ) from e
            try:
                msg = await sub.next_msg(timeout=timeout_s)
            except nats.errors.TimeoutError as e:
                raise NoVerdictError(
                    f"submission stored (seq {ack.seq}) but no verdict within {timeout_s:g}s: "
                    "is an intake handler running?",
                    seq=ack.seq,
                ) from e
            return VERDICT_DECODER.decode(msg.data)
        finally:
            if sub is not None:
                await sub.unsubscribe()

    async def _duplicate_verdict(
        self, body: bytes, msg_id: str | None, timeout_s: float
    ) -> SubmitVerdict:
        """The verdict of the submission that ``body`` (dropped by the stream) duplicates."""
        limits = await self.limits()
        digest: str | None = None
        try:
            digest = parse_submission(
                body,
                received_at_ms=now_ms(),
                max_bytes=limits.submission_max_bytes,
                max_metadata_entries=limits.max_metadata_entries,
            ).digest
        except SchemaError as e:
            # The first one was rejected for the same reasons, unless its deadline has only
            # passed since: then its verdict is looked up like an accepted one's.
            if any(x.path != "$.deadline_at_ms" for x in e.errors):
                return SubmitVerdict(accepted=False, duplicate=True, errors=e.errors)
        obj = ANY_DECODER.decode(body)
        key = obj.get("idempotency_key") if isinstance(obj, dict) else None
        key = key if isinstance(key, str) else None
        token = token_for(key, msg_id)
        if token is None:  # the stream only de-duplicates by Nats-Msg-Id: cannot happen
            return SubmitVerdict(accepted=True, duplicate=True)
        changes = self._follow("idempotency", token, timeout_s)
        with anyio.move_on_after(timeout_s):
            async with contextlib.aclosing(changes):
                async for change in changes:
                    if change.value is None:
                        continue
                    first_id, first_digest = read_token(change.value)
                    if digest is not None and first_digest not in (None, digest):
                        by: RepeatedBy = "idempotency_key" if key else "msg_id"
                        return SubmitVerdict(
                            accepted=False,
                            job_id=first_id,
                            duplicate=True,
                            errors=[conflict_error(first_id, by=by)],
                            refusal="conflict",
                        )
                    state: JobState | None = None
                    with contextlib.suppress(NotFoundError, SchemaError):
                        state = (await self.get_job(first_id)).state
                    return SubmitVerdict(
                        accepted=True, job_id=first_id, duplicate=True, state=state
                    )
        raise NoVerdictError(
            f"duplicate of an earlier submission (Nats-Msg-Id {msg_id!r}) whose job is not known "
            f"within {timeout_s:g}s: is an intake handler running?"
        )

    async def get_job(self, job_id: str) -> JobRecord:
        """The current record of ``job_id``.

        Raises:
            NotFoundError: no such job.
            SchemaError: its stored record cannot be read (see :data:`STORED_MAX_DEPTH`).
        """
        kv = await self.bus.kv("jobs")
        try:
            entry = await kv.get(job_id)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.InvalidKeyError) as e:
            raise NotFoundError(f"no job {job_id!r}") from e
        data = entry.value or b""
        if too_deep(data, STORED_MAX_DEPTH):
            raise SchemaError(
                [
                    FieldError(
                        path="$",
                        reason=f"the stored record of job {job_id!r} nests deeper than "
                        f"{STORED_MAX_DEPTH} levels (stored before submissions were limited to "
                        f"{MAX_JSON_DEPTH}); it cannot be served",
                    )
                ]
            )
        try:
            return JOB_DECODER.decode(data)
        except msgspec.DecodeError as e:
            raise SchemaError([FieldError(path="$", reason=f"unreadable record: {e}")]) from e

    async def list_jobs(
        self, *, states: set[JobState] | None = None, limit: int | None = None
    ) -> list[JobRecord]:
        """Every job (optionally only in ``states``), newest first.

        Records that cannot be read (undecodable, or nested deeper than
        :data:`STORED_MAX_DEPTH`) are left out: one bad record must not hide every other job.

        Reads the latest revision of every key through a short-lived ordered consumer
        (:func:`~valkyrie.bus.snapshot.read_stored`).
        """
        await self.bus.kv("jobs")  # a clear error when the bucket does not exist
        bucket = self.bus.names.bucket("jobs")
        config = ConsumerConfig(deliver_policy=DeliverPolicy.LAST_PER_SUBJECT)
        raw, _ = await read_stored(
            self.bus, f"KV_{bucket}", f"$KV.{bucket}.>", config, limit=10_000_000
        )
        records: list[JobRecord] = []
        for _seq, data, headers in raw:
            if headers.get("KV-Operation") in ("DEL", "PURGE") or not data:
                continue
            try:
                if too_deep(data, STORED_MAX_DEPTH):
                    continue
                record = JOB_DECODER.decode(data)
            except msgspec.DecodeError:
                continue
            if states is None or record.state in states:
                records.append(record)
        records.sort(key=lambda r: (r.submitted_at_ms, r.id), reverse=True)
        return records[:limit] if limit is not None else records

    async def wait_for_job(
        self, job_id: str, *, states: frozenset[JobState] = TERMINAL_STATES, timeout_s: float = 60.0
    ) -> JobRecord:
        """Wait until ``job_id`` reaches one of ``states`` (terminal by default).

        Raises:
            TimeoutError: it did not within ``timeout_s``.
        """
        changes = self._follow("jobs", job_id, timeout_s)
        with anyio.fail_after(timeout_s):
            async with contextlib.aclosing(changes):
                async for change in changes:
                    if change.value is None:
                        continue
                    record = JOB_DECODER.decode(change.value)
                    if record.state in states:
                        return record
        raise BusError(f"the watch of job {job_id!r} ended")

    async def _follow(self, bucket: str, key: str, poll_s: float) -> AsyncGenerator[KvChange, None]:
        """The key's value, then each change: a watch, or reads every ``POLL_S`` (submitters)."""
        kv = await self.bus.kv(bucket)
        if not self._poll:
            changes = watch_kv(kv, key, poll_s=poll_s)
            async with contextlib.aclosing(changes):
                async for change in changes:
                    yield change
            return
        last = -1
        while True:
            try:
                entry = await kv.get(key)
            except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
                entry = None
            revision = int(entry.revision or 0) if entry is not None else 0
            if entry is not None and revision != last:
                last = revision
                yield KvChange(key=key, value=entry.value or None, revision=revision)
            await anyio.sleep(POLL_S)

    async def explain(self, job_id: str, *, timeout_s: float = 5.0) -> JobExplanation:
        """Why ``job_id`` is pending (constraints, queue position, estimate) or where it went.

        Every dispatcher answers. For a queued job the answer of the dispatcher holding it
        (``held``) is the one with its place in line, so after the first answer this waits up to
        ``EXPLAIN_GRACE_S`` for the holder's; any other answer is the same from every dispatcher.

        Raises:
            NotFoundError: no such job.
            BusError: no dispatcher answered.
        """
        nc = self.bus.nc
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        best: JobExplanation | None = None
        try:
            try:
                await nc.publish(
                    self.bus.names.explain, encode(ExplainRequest(job_id=job_id)), reply=inbox
                )
            except nats.errors.Error as e:
                raise BusError(f"explain request not sent: {e!r}") from e
            deadline = time.monotonic() + timeout_s
            while (left := deadline - time.monotonic()) > 0:
                try:
                    msg = await sub.next_msg(timeout=left)
                except nats.errors.TimeoutError:
                    break
                if not msg.data and (msg.headers or {}).get("Status") == "503":
                    break  # no responders
                explanation = _EXPLANATION.decode(msg.data)
                if explanation.held or explanation.state != JobState.QUEUED:
                    best = explanation
                    break
                if best is None:
                    best = explanation
                    deadline = min(deadline, time.monotonic() + EXPLAIN_GRACE_S)
        finally:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
        if best is None:
            raise BusError("no dispatcher answered the explain request: is one running?")
        if best.error and best.state == "unknown":
            raise NotFoundError(best.error)
        return best

    async def events(
        self,
        pattern: str = ">",
        *,
        start_seq: int | None = None,
        since: dt.datetime | None = None,
        deliver_all: bool = False,
        idle_timeout_s: float | None = None,
    ) -> AsyncIterator[tuple[int, Event]]:
        """Follow the event stream from now (or a sequence, or a time), yielding ``(seq, event)``.

        ``pattern`` is a subject filter relative to ``<prefix>.events.`` (``job.*.queued``,
        ``job.<id>.>``). With ``idle_timeout_s``, iteration ends after that long without events.
        """
        if start_seq is not None:
            config = ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start_seq
            )
        elif since is not None:
            config = ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_TIME, opt_start_time=since
            )
        elif deliver_all:
            config = ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
        else:
            config = ConsumerConfig(deliver_policy=DeliverPolicy.NEW)
        sub = await self.bus.js.subscribe(
            self.bus.names.events(pattern),
            ordered_consumer=True,
            config=config,
            stream=self.bus.names.stream("events"),
        )
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=idle_timeout_s or 3600.0)
                except TimeoutError:  # nats raises its own subclass or the builtin
                    if idle_timeout_s is not None:
                        return
                    continue
                try:
                    event = EVENT_DECODER.decode(msg.data)
                except msgspec.DecodeError:
                    continue
                yield int(msg.metadata.sequence.stream), event
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                await sub.unsubscribe()
