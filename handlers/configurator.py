"""Config: validate changes from ``<prefix>.config.change[.<identity>]``, write new revisions.

A revision holds the runtime overrides (dotted keys); each process layers them over its own base
(defaults, profile, file, environment) and applies them live. A change that touches a key which
cannot change live, or that makes the config invalid, is refused with every reason
(:func:`valkyrie.domain.config_plan.plan_change` plans it). Every accepted change is an audit
event (who, when, the diff); rejections are events too. Who is the identity the subject
carries (a body's ``requested_by`` may only refine it), and the verdict goes to
``Valkyrie-Reply-To`` only inside that identity's inbox. This handler is the only writer of the
config bucket (docs/security.md).
"""

from __future__ import annotations

from typing import Any

import anyio
import msgspec
import nats.errors
import nats.js.errors
from anyio.abc import TaskStatus
from nats.aio.msg import Msg

from schemas import (
    ConfigChange,
    ConfigChanged,
    ConfigRejected,
    ConfigRevision,
    ConfigVerdict,
    FieldError,
    SafeDecoder,
    convert_or_errors,
    depth_error,
    too_deep,
)
from valkyrie import (
    REPLY_TO_HEADER,
    GiveUp,
    HandlerContext,
    RetryLater,
    headers_of,
)
from valkyrie.bus import ANY_DECODER, encode, now_ms
from valkyrie.config import CONFIG_KEY, known_keys, validate_dotted
from valkyrie.domain.config_plan import plan_change
from valkyrie.domain.identity import reply_allowed, requester
from valkyrie.runtime import HandlerBase

__all__ = ["ConfigWorker", "create"]

_REVISION = SafeDecoder(ConfigRevision)
_KNOWN_KEYS = frozenset(known_keys())


class ConfigWorker(HandlerBase):
    """Consumes config changes through the durable consumer ``config``."""

    def __init__(self, ctx: HandlerContext) -> None:
        super().__init__(ctx)

    async def run(
        self, stop: anyio.Event, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Consume changes until ``stop`` is set."""
        self._kv = await self._bus.kv("config")
        await self.consume(
            stop,
            stream="commands",
            filter_subject=self._bus.names.config_changes(),
            handle=self.handle,
            concurrency=1,  # revisions are sequential
            task_status=task_status,
        )

    def _sender(self, msg: Msg) -> str | None:
        return self._bus.names.sender(msg.subject, self._bus.names.config_change)

    async def _reply(self, msg: Msg, verdict: ConfigVerdict) -> None:
        reply_to = headers_of(msg).get(REPLY_TO_HEADER)
        if reply_to and reply_allowed(reply_to, self._sender(msg)):
            try:
                await self._bus.nc.publish(reply_to, encode(verdict))
            except (nats.errors.Error, ValueError):
                pass

    async def _history(self) -> dict[int, dict[str, Any]]:
        out: dict[int, dict[str, Any]] = {0: {}}
        try:
            entries = await self._kv.history(CONFIG_KEY)
        except nats.js.errors.NoKeysError:
            return out
        for entry in entries:
            if entry.value:
                rev = _REVISION.decode(entry.value)
                out[rev.revision] = rev.values
        return out

    async def handle(self, msg: Msg) -> None:
        """Apply one change request."""
        if too_deep(msg.data):
            verdict = ConfigVerdict(accepted=False, errors=[depth_error()])
            await self._reply(msg, verdict)
            raise GiveUp("config change nested too deep", errors=verdict.errors)
        try:
            raw = ANY_DECODER.decode(msg.data)
        except msgspec.DecodeError as e:
            verdict = ConfigVerdict(
                accepted=False, errors=[FieldError(path="$", reason=f"invalid JSON: {e}")]
            )
            await self._reply(msg, verdict)
            raise GiveUp("invalid config change", errors=verdict.errors) from e
        change, errors = convert_or_errors(ConfigChange, raw)
        if change is None:
            await self._reply(msg, ConfigVerdict(accepted=False, errors=errors))
            raise GiveUp("invalid config change", errors=errors)
        try:
            entry = await self._kv.get(CONFIG_KEY)
            current = _REVISION.decode(entry.value or b"") if entry.value else None
            last = int(entry.revision or 0)
        except nats.js.errors.KeyNotFoundError:
            current, last = None, 0
        number = current.revision if current else 0
        overrides = current.values if current else {}
        # the history is read only for a rollback (it is up to 64 revisions)
        history = await self._history() if change.rollback_to is not None else {}
        new, diff, errors, warnings = plan_change(
            change,
            overrides,
            self._ctx.config.loaded.base(),
            history,
            known_keys=_KNOWN_KEYS,
            validate=validate_dotted,
        )
        who = requester(self._sender(msg), change.requested_by) or "unknown"
        if new is None:
            await self._events.emit(
                ConfigRejected(
                    subject_id=str(number + 1),
                    requested_by=who,
                    reason=change.reason,
                    errors=list(errors),
                )
            )
            await self._reply(
                msg, ConfigVerdict(accepted=False, errors=errors, warnings=warnings, diff=diff)
            )
            return
        if not diff and new == overrides:
            await self._reply(msg, ConfigVerdict(accepted=True, revision=number, warnings=warnings))
            return
        revision = ConfigRevision(
            revision=number + 1,
            at_ms=now_ms(),
            changed_by=who,
            values=new,
            diff=diff,
            reason=change.reason
            or (f"rollback to {change.rollback_to}" if change.rollback_to is not None else None),
        )
        try:
            if last:
                await self._kv.update(CONFIG_KEY, encode(revision), last=last)
            else:
                await self._kv.create(CONFIG_KEY, encode(revision))
        except nats.js.errors.KeyWrongLastSequenceError as e:
            raise RetryLater("config changed concurrently; retrying", delay_s=0.05) from e
        await self._events.emit(
            ConfigChanged(
                subject_id=str(revision.revision),
                changed_by=who,
                at_ms=revision.at_ms,
                diff=diff,
                reason=revision.reason,
            )
        )
        await self._reply(
            msg,
            ConfigVerdict(accepted=True, revision=revision.revision, warnings=warnings, diff=diff),
        )


def create(ctx: HandlerContext) -> ConfigWorker:
    """Entry point: build the config worker."""
    return ConfigWorker(ctx)
