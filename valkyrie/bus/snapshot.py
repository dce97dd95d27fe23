"""Reading what a stream holds now (a whole KV bucket, a window of events), exactly and briefly.

An ordered push consumer, created without a name: the server names it, delivers to the reader's
own inbox and forgets it once the reader unsubscribes. Nothing here pulls from a named consumer,
so a read-only identity needs no permission to pull from, or acknowledge on, any consumer of a
stream (where the handlers' durable consumers live): only ``CONSUMER.CREATE.<stream>`` and its
flow-control replies (docs/security.md).
"""

from __future__ import annotations

import anyio
import nats.errors
import nats.js.errors
from nats.js.api import ConsumerConfig

from valkyrie.bus.connection import Bus
from valkyrie.errors import BusError

__all__ = ["Stored", "read_stored"]

#: one stored message: (stream sequence, data, headers)
Stored = tuple[int, bytes, dict[str, str]]


async def read_stored(
    bus: Bus,
    stream: str,
    subject: str,
    config: ConsumerConfig,
    *,
    limit: int,
    timeout_s: float = 10.0,
) -> tuple[list[Stored], bool]:
    """Every message the consumer ``config`` starts with (at most ``limit``), oldest first.

    The consumer's info, read once, says how many there are (those delivered so far plus those
    pending), so the read ends as soon as it has them; a KV watcher's end marker can arrive
    before the entries. Returns the messages and whether ``limit`` cut the read short.

    Raises:
        BusError: the stream cannot be read, or went quiet for ``timeout_s``.
    """
    out: list[Stored] = []
    truncated = False
    remaining = 0
    try:
        sub = await bus.js.subscribe(subject, stream=stream, ordered_consumer=True, config=config)
        try:
            info = await sub.consumer_info()
            delivered = info.delivered.consumer_seq if info.delivered else 0
            remaining = int(delivered or 0) + int(info.num_pending or 0)
            if remaining > limit:
                remaining, truncated = limit, True
            while remaining > 0:
                msg = await sub.next_msg(timeout=timeout_s)
                remaining -= 1
                out.append((int(msg.metadata.sequence.stream), msg.data, dict(msg.headers or {})))
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                await sub.unsubscribe()
    except TimeoutError as e:  # nats raises its own subclass or the builtin
        raise BusError(f"reading {stream} timed out with {remaining} messages unread") from e
    except (nats.errors.Error, nats.js.errors.Error) as e:
        raise BusError(f"reading {stream} failed: {e!r}") from e
    return out, truncated
