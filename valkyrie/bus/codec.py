"""Encoders and decoders, built once (msgspec's advice) and shared by every module."""

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
    SubmitVerdict,
    UpdateVerdict,
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
    "UPDATE_VERDICT_DECODER",
    "VERDICT_DECODER",
    "encode",
    "new_id",
    "now_ms",
]

ENCODER = msgspec.json.Encoder()
ANY_DECODER: msgspec.json.Decoder[Any] = msgspec.json.Decoder()
JOB_DECODER = msgspec.json.Decoder(JobRecord)
RUNNER_DECODER = msgspec.json.Decoder(RunnerRecord)
EVENT_DECODER = msgspec.json.Decoder(Event)
DEAD_DECODER = msgspec.json.Decoder(DeadLetter)
VERDICT_DECODER = msgspec.json.Decoder(SubmitVerdict)
DISPATCH_DECODER = msgspec.json.Decoder(Dispatch)
UPDATE_DECODER: msgspec.json.Decoder[JobUpdate] = msgspec.json.Decoder(JobUpdate)
UPDATE_VERDICT_DECODER = msgspec.json.Decoder(UpdateVerdict)
LOG_DECODER = msgspec.json.Decoder(JobLog)
HEARTBEAT_DECODER = msgspec.json.Decoder(RunnerHeartbeat)
REGISTRATION_DECODER = msgspec.json.Decoder(RunnerRegistration)
CONFIG_REVISION_DECODER = msgspec.json.Decoder(ConfigRevision)


def encode(obj: Any) -> bytes:
    """Encode a Struct (or plain data) as JSON."""
    return ENCODER.encode(obj)


def now_ms() -> int:
    """The current instant as integer milliseconds since the Unix epoch (the wire's time format)."""
    return time.time_ns() // 1_000_000


def new_id() -> str:
    """A new random id (32 hex characters), valid as a subject token and KV key."""
    return uuid.uuid4().hex
