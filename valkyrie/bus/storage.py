"""What a full JetStream looks like, and clear errors when provisioning finds no room.

Every stream and bucket has a size limit (``VALKYRIE_<NAME>_MAX_BYTES``), which the server
reserves in its store when the stream is created: a server without room for a limit refuses the
stream (10047), a stream at its limit refuses a message (10077, "maximum bytes exceeded"), and a
store that is full refuses everything (10023). Rewriting a KV entry in place (history 1) needs no
more room than the entry had, so records of jobs already accepted can still move on when their
bucket is full.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import nats.errors
import nats.js.errors

from valkyrie.errors import BusError, StorageFullError

__all__ = ["full_error", "provisioning", "storage_full"]

#: insufficient resources (the store is full), memory / storage resources exceeded (no room to
#: reserve a stream's limit)
_NO_ROOM = frozenset({10023, 10028, 10047})
#: the stream failed to store a message (a limit was reached: bytes, messages, per subject)
_STORE_FAILED = 10077
#: JetStream not enabled (for the server / the account)
_NO_JETSTREAM = frozenset({10039, 10076})


def storage_full(e: BaseException) -> bool:
    """Whether ``e`` is JetStream refusing to store for want of room."""
    if not isinstance(e, nats.js.errors.APIError):
        return False
    if e.err_code in _NO_ROOM:
        return True
    return e.err_code == _STORE_FAILED and "exceeded" in (e.description or "")


def full_error(e: BaseException, what: str) -> StorageFullError:
    """The error to raise when ``what`` was refused for want of room (``e``)."""
    detail = getattr(e, "description", None) or repr(e)
    return StorageFullError(
        f"{what} not stored: JetStream is full ({detail}); nothing stored before is lost: try "
        "again once jobs have ended, or raise the limit (docs/operations.md#storage-limits)"
    )


@contextmanager
def provisioning(stream: str, short: str, max_bytes: int | None) -> Iterator[None]:
    """Turn a failure to create or update ``stream`` into a :class:`BusError` that says why."""
    try:
        yield
    except nats.errors.Error as e:
        setting = f"VALKYRIE_{short.upper()}_MAX_BYTES"
        if storage_full(e):
            raise BusError(
                f"provisioning JetStream failed: the server has no room for {stream} "
                f"({max_bytes} bytes, {setting}): {getattr(e, 'description', None) or e!r}. "
                f"Lower {setting} (and the other size limits: docs/operations.md#storage-limits) "
                "or give the server more storage (jetstream max_file / max_mem)"
            ) from e
        hint = ""
        if isinstance(e, nats.errors.NoRespondersError) or (
            isinstance(e, nats.js.errors.APIError) and e.err_code in _NO_JETSTREAM
        ):
            hint = " (is JetStream enabled?)"
        raise BusError(f"provisioning JetStream failed on {stream}: {e!r}{hint}") from e
