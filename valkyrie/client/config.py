"""Reading and changing the runtime config over the bus."""

from __future__ import annotations

from typing import Any

import nats.errors
import nats.js.errors

from schemas import ConfigChange, ConfigRevision, ConfigVerdict, SafeDecoder
from valkyrie.bus.codec import CONFIG_REVISION_DECODER, encode, new_id
from valkyrie.bus.connection import Bus
from valkyrie.client.jobs import REPLY_TO_HEADER
from valkyrie.config.live import CONFIG_KEY
from valkyrie.errors import BusError

__all__ = ["ConfigClient"]

_VERDICT = SafeDecoder(ConfigVerdict)


class ConfigClient:
    """Config operations: every change goes through the config handler (validated, audited)."""

    def __init__(self, bus: Bus, *, actor: str = "cli") -> None:
        self.bus = bus
        self.actor = actor

    async def change(
        self,
        *,
        set_values: dict[str, Any] | None = None,
        replace: dict[str, Any] | None = None,
        rollback_to: int | None = None,
        reason: str | None = None,
        timeout_s: float = 10.0,
    ) -> ConfigVerdict:
        """Request a change and wait for the verdict.

        Raises:
            BusError: not stored, or no config handler answered in time.
        """
        change = ConfigChange(
            set=set_values or {},
            replace=replace,
            rollback_to=rollback_to,
            requested_by=self.actor,
            reason=reason,
        )
        nc = self.bus.nc
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox, max_msgs=1)
        try:
            try:
                await self.bus.js.publish(
                    self.bus.names.config_change_as(self.bus.identity),
                    encode(change),
                    headers={REPLY_TO_HEADER: inbox, "Nats-Msg-Id": f"config-{new_id()}"},
                    timeout=timeout_s,
                )
            except (nats.errors.Error, nats.js.errors.Error) as e:
                raise BusError(f"config change not stored: {e!r}") from e
            try:
                msg = await sub.next_msg(timeout=timeout_s)
            except TimeoutError as e:
                raise BusError(
                    f"no verdict within {timeout_s:g}s: is a `config` handler running?"
                ) from e
            return _VERDICT.decode(msg.data)
        finally:
            await sub.unsubscribe()

    async def current(self) -> ConfigRevision | None:
        """The revision in force (``None`` before the first change)."""
        kv = await self.bus.kv("config")
        try:
            entry = await kv.get(CONFIG_KEY)
        except nats.js.errors.KeyNotFoundError:
            return None
        return CONFIG_REVISION_DECODER.decode(entry.value) if entry.value else None

    async def history(self) -> list[ConfigRevision]:
        """Every revision kept (the bucket keeps the last 64), oldest first."""
        kv = await self.bus.kv("config")
        try:
            entries = await kv.history(CONFIG_KEY)
        except nats.js.errors.NoKeysError:
            return []
        return [CONFIG_REVISION_DECODER.decode(e.value) for e in entries if e.value]
