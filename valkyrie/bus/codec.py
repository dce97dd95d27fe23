"""Encoders and decoders, built once (msgspec's advice) and shared by every module.

Decoders are :class:`~schemas.SafeDecoder`: a document nested too deep to decode is a
``msgspec.DecodeError`` like any other unreadable one.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import msgspec

from schemas import (
    ConfigRevision,
    DeadLetter,
    Dispatch,
    Event,
    JobLog,
    JobRecord,
    JobUpdate,
    RunnerHeartbeat,
    RunnerRecord,
    RunnerRegistration,
    SafeDecoder,
    SubmitVerdict,
)

__all__ = [
    "ANY_DECODER",
    "CONFIG_REVISION_DECODER",
    "DEAD_DECODER",
    "DISPATCH_DECODER",
    "ENCODER",
    "EVENT_DECODER",
    "HEARTBEAT_DECODER",
    "JOB_DECODER",
    "LOG_DECODER",
    "REGISTRATION_DECODER",
    "RUNNER_DECODER",
    "UPDATE_DECODER",
    "VERDICT_DECODER",
    "encode",
    "new_id",
    "now_ms",
]

ENCODER = msgspec.json.Encoder()
ANY_DECODER: SafeDecoder[Any] = SafeDecoder()
JOB_DECODER = SafeDecoder(JobRecord)
RUNNER_DECODER = SafeDecoder(RunnerRecord)
EVENT_DECODER = SafeDecoder(Event)
DEAD_DECODER = SafeDecoder(DeadLetter)
VERDICT_DECODER = SafeDecoder(SubmitVerdict)
DISPATCH_DECODER = SafeDecoder(Dispatch)
UPDATE_DECODER: SafeDecoder[JobUpdate] = SafeDecoder(JobUpdate)
LOG_DECODER = SafeDecoder(JobLog)
HEARTBEAT_DECODER = SafeDecoder(RunnerHeartbeat)
REGISTRATION_DECODER = SafeDecoder(RunnerRegistration)
CONFIG_REVISION_DECODER = SafeDecoder(ConfigRevision)


def encode(obj: Any) -> bytes:
    """Encode a Struct (or plain data) as JSON."""
    return ENCODER.encode(obj)


def now_ms() -> int:
    """The current instant as integer milliseconds since the Unix epoch (the wire's time format)."""
    return time.time_ns() // 1_000_000


def new_id() -> str:
    """A new random id (32 hex characters), valid as a subject token and KV key."""
    return uuid.uuid4().hex
