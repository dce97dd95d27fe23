"""Every error Valkyrie raises, under one root.

::

    ValkyrieError
    ├── ConfigError            invalid settings or config documents
    ├── SchemaError            a message or record that does not match the wire contract
    ├── BusError               talking to NATS failed
    │   ├── ConnectError       could not connect (the message says what to check)
    │   ├── ServerError        the embedded nats-server could not start or stopped
    │   ├── NotFoundError      a job, runner or message that does not exist
    │   ├── StorageFullError   a stream or bucket (or the server's store) has no room left
    │   └── NoVerdictError     a submission was stored, but no verdict came in time
    └── HandlerOutcome         raised inside a handler to decide a message's fate
        ├── RetryLater         nak with a delay: the message is delivered again
        └── GiveUp             dead-letter the message with a reason and stop redelivering it
"""

from __future__ import annotations

from schemas import FieldError

__all__ = [
    "BusError",
    "ConfigError",
    "ConnectError",
    "GiveUp",
    "HandlerOutcome",
    "NoVerdictError",
    "NotFoundError",
    "RetryLater",
    "SchemaError",
    "ServerError",
    "StorageFullError",
    "ValkyrieError",
]


class ValkyrieError(Exception):
    """The root of every error Valkyrie raises."""


class ConfigError(ValkyrieError):
    """Raised when settings or a config document are invalid."""


class SchemaError(ValkyrieError):
    """Raised when a message does not match the wire contract; ``errors`` names each field."""

    def __init__(self, errors: list[FieldError]) -> None:
        self.errors = errors
        super().__init__("; ".join(f"{e.path}: {e.reason}" for e in errors) or "invalid message")


class BusError(ValkyrieError):
    """Raised when an operation on NATS fails."""


class ConnectError(BusError):
    """Raised when no connection to NATS can be made."""


class ServerError(BusError):
    """Raised when the embedded nats-server cannot start or stops unexpectedly."""


class NotFoundError(BusError):
    """Raised when a job, runner or stored message does not exist."""


class StorageFullError(BusError):
    """Raised when JetStream refused to store something for want of room.

    A stream or bucket reached its size limit (a ``VALKYRIE_<NAME>_MAX_BYTES`` setting) or the
    server's store is full. Nothing stored before is lost; trying again succeeds once room is
    made (jobs end and age out, limits are raised).
    """


class NoVerdictError(BusError):
    """Raised when a submission is stored (durable) but intake's verdict did not come in time.

    Unlike other bus errors this one says the job *will* be taken in: submitting the same
    body again without a ``Nats-Msg-Id`` or ``idempotency_key`` would make a second job. ``seq`` is
    the submission's stream sequence (``None`` for a duplicate whose first copy is unknown here).
    """

    def __init__(self, message: str, *, seq: int | None = None) -> None:
        self.seq = seq
        super().__init__(message)


class HandlerOutcome(ValkyrieError):
    """Base of the exceptions a handler raises to settle a message other than by acking it."""


class RetryLater(HandlerOutcome):
    """The message could not be processed now; deliver it again after ``delay_s``."""

    def __init__(self, reason: str, *, delay_s: float = 1.0) -> None:
        self.reason = reason
        self.delay_s = delay_s
        super().__init__(reason)


class GiveUp(HandlerOutcome):
    """The message can never be processed: dead-letter it with ``reason`` and ``errors``."""

    def __init__(self, reason: str, *, errors: list[FieldError] | None = None) -> None:
        self.reason = reason
        self.errors = errors or []
        super().__init__(reason)
