"""Clients of a running installation.

Jobs (:class:`Client`), operator actions (:class:`Admin`), runtime config (:class:`ConfigClient`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from valkyrie._lazy import attach as _attach

if TYPE_CHECKING:
    from valkyrie.client.admin import (
        Admin,
        StoredDeadLetter,
    )
    from valkyrie.client.config import (
        ConfigClient,
    )
    from valkyrie.client.jobs import (
        REPLY_TO_HEADER,
        REQUESTED_BY_HEADER,
        STRICT_HEADER,
        Client,
    )

if not TYPE_CHECKING:  # type checkers see the imports above, and no catch-all __getattr__
    __getattr__, __dir__ = _attach(__name__, __file__)

__all__ = [
    "REPLY_TO_HEADER",
    "REQUESTED_BY_HEADER",
    "STRICT_HEADER",
    "Admin",
    "Client",
    "ConfigClient",
    "StoredDeadLetter",
]
