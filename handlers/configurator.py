"""Config: validate changes from ``<prefix>.config.change`` and write them as new revisions.

A revision holds the runtime overrides (dotted keys); each process layers them over its own base
(defaults, profile, file, environment) and applies them live. A change that touches a key which
cannot change live, or that makes the config invalid, is refused with every reason. Every accepted
change is an audit event (who, when, the diff); rejections are events too.
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
    convert_or_errors,
)
from valkyrie import (
    REPLY_TO_HEADER,
    GiveUp,
    HandlerContext,
    RetryLater,
    headers_of,
)
from valkyrie.bus.codec import ANY_DECODER, encode, now_ms
from valkyrie.config.live import CONFIG_KEY
from valkyrie.config.load import known_keys
from valkyrie.config.model import flatten, is_live
from valkyrie.config.validate import validate_dotted
from valkyrie.runtime.base import HandlerBase

__all__ = ["ConfigWorker", "create", "plan_change"]

_REVISION = msgspec.json.Decoder(ConfigRevision)


def plan_change(
    change: ConfigChange,
    current: dict[str, Any],
    base: dict[str, Any],
    history: dict[int, dict[str, Any]],
) -> tuple[dict[str, Any] | None, dict[str, Any], list[FieldError], list[FieldError]]:
    """Pure: the new runtime overrides for ``change``, the diff, errors and warnings."""
    errors: list[FieldError] = []
    if change.rollback_to is not None:
        if change.rollback_to not in history:
            return (
                None,
                {},
                [
                    FieldError(
                        path="rollback_to", reason=f"no revision {change.rollback_to} in history"
                    )
                ],
                [],
            )
        new = dict(history[change.rollback_to])
    elif change.replace is not None:
        new = {k: v for k, v in flatten(change.replace).items() if base.get(k) != v}
    else:
        new = dict(current)
        for key, value in change.set.items():
            if value is None:
                new.pop(key, None)
            else:
                new[key] = value
    keys = known_keys()
    old_effective = {**base, **current}
    new_effective = {**base, **new}
    # an override that is added or changed is checked even when it equals the value here: other
    # processes have other bases (file, environment), and would apply it live
    touched = {k for k, v in new.items() if k not in current or current[k] != v}
    diff: dict[str, Any] = {}
    for key in sorted(set(old_effective) | set(new_effective) | touched):
        before, after = old_effective.get(key), new_effective.get(key)
        if before == after and key not in touched:
            continue
        if key not in keys:
            errors.append(FieldError(path=key, reason="unknown key"))
            continue
        live, why = is_live(key)
        if not live:
            errors.append(
                FieldError(
                    path=key,
                    reason=f"cannot change live: {why}; change it in the file or environment and restart",
                )
            )
            continue
        if before != after:
            diff[key] = {"old": before, "new": after}
    if errors:
        # report the values of the other keys too: validate them with the refused keys left alone
        refused = {e.path for e in errors}
        rest = {k: v for k, v in new_effective.items() if k not in refused}
        rest.update({k: old_effective[k] for k in refused if k in old_effective})
        others = validate_dotted(rest)
        errors += [e for e in others.errors if e.path not in refused]
        return None, diff, errors, others.warnings
    result = validate_dotted(new_effective)
    if result.config is None:
        return None, diff, result.errors, result.warnings
    return new, diff, [], result.warnings


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
            filter_subject=self._bus.names.config_change,
            handle=self.handle,
            concurrency=1,  # revisions are sequential
            task_status=task_status,
        )

    async def _reply(self, msg: Msg, verdict: ConfigVerdict) -> None:
        reply_to = headers_of(msg).get(REPLY_TO_HEADER)
        if reply_to:
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
            change, overrides, self._ctx.config.loaded.base(), history
        )
        who = change.requested_by
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
