"""Where a running ``valkyrie up`` listens, recorded in its data directory for other commands.

A second shell does not share the first one's environment: a server started with
``VALKYRIE_EMBEDDED_PORT=4333`` could not be found by a plain ``valkyrie jobs ls``. ``up`` writes
``<data dir>/up.json`` once it serves (its NATS URL, HTTP URL, pid, and the config it runs
below the runtime revision) and removes it when it stops; commands read it when no
``VALKYRIE_NATS_URL`` says where to go. A record whose process is gone is ignored.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import msgspec

from valkyrie.config.settings import Settings
from valkyrie.runtime.app import default_data_dir

__all__ = ["RECORD_NAME", "UpRecord", "data_dir", "read_record", "remove_record", "write_record"]

RECORD_NAME = "up.json"


class UpRecord(msgspec.Struct, kw_only=True):
    """What ``valkyrie up`` tells other commands about itself."""

    pid: int
    nats_url: str
    prefix: str
    started_at_ms: int
    http_url: str | None = None
    #: the dotted config it runs below the runtime revision, and each value's layer
    base: dict[str, Any] = msgspec.field(default_factory=dict)
    sources: dict[str, str] = msgspec.field(default_factory=dict)


_DECODER = msgspec.json.Decoder(UpRecord)


def data_dir(settings: Settings) -> Path:
    """The data directory: ``VALKYRIE_DATA_DIR``, else the user data directory."""
    return Path(settings.data_dir) if settings.data_dir else default_data_dir()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


def write_record(settings: Settings, record: UpRecord) -> Path:
    """Write (or replace) the record, readable by this user only."""
    path = data_dir(settings) / RECORD_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".tmp")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(msgspec.json.encode(record))
    partial.replace(path)  # readers never see half a record
    return path


def read_record(settings: Settings) -> UpRecord | None:
    """The record of a ``valkyrie up`` that is still running, if there is one."""
    path = data_dir(settings) / RECORD_NAME
    try:
        record = _DECODER.decode(path.read_bytes())
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return None
    return record if _alive(record.pid) else None


def remove_record(settings: Settings, pid: int) -> None:
    """Remove the record if it is ``pid``'s (a newer ``up`` may have replaced it)."""
    path = data_dir(settings) / RECORD_NAME
    with contextlib.suppress(OSError, msgspec.DecodeError, msgspec.ValidationError):
        if _DECODER.decode(path.read_bytes()).pid == pid:
            path.unlink()
