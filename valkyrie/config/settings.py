"""Process settings: how to reach NATS and how to provision it.

Read from ``VALKYRIE_*`` environment variables over the defaults below; unknown keys are refused.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import msgspec

from valkyrie.errors import ConfigError

__all__ = ["Settings"]

_ENV_PREFIX = "VALKYRIE_"


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Settings every Valkyrie process shares.

    Attributes:
        nats_url: NATS server URL(s), comma separated; ``None`` starts an embedded nats-server.
        profile: environment profile of the runtime config (docs/configuration.md).
        config_file: TOML file layered over the profile.
        prefix: subject prefix and stream/bucket name prefix.
        data_dir: where the embedded server keeps its store; ``None`` = the user data directory.
        embedded_port: client port of the embedded server.
        storage: JetStream storage for streams and buckets.
        replicas: stream/bucket replica count (1 for one server, 3 for a cluster).
        metrics_port: port of the Prometheus ``/metrics`` endpoint; 0 disables it.
        metrics_host: address the metrics endpoint binds to.
        submission_max_bytes: largest accepted submission body.
        events_max_age_s: how long events are kept.
        events_max_bytes: how many bytes of events are kept.
        logs_max_age_s: how long job logs are kept.
        dead_max_age_s: how long dead letters are kept.
        duplicate_window_s: how long ``Nats-Msg-Id`` de-duplicates publishes.
        max_deliver: deliveries before a message is dead-lettered.
        ack_wait_s: how long a handler may hold a message before it is redelivered.
        handler_concurrency: messages one handler processes at once.
        connect_timeout_s: how long to keep trying to connect at start-up.
        accept_timeout_ms: a dispatch not accepted within this is taken back and placed again.
        runner_lost_after_ms: a runner silent for this long is offline and its jobs are re-queued.
        reconcile_interval_ms: how often dispatchers check for orphaned slots and lost dispatches.
        supervise_interval_ms: how often the supervisor checks liveness and execution time.
        execution_grace_ms: extra time past ``max_execution_time_s`` before the control plane
            ends a job whose runner did not (a silent runner's job ends timed out).
        cancel_grace_s: how long a runner gets between SIGTERM and SIGKILL when cancelling.
    """

    nats_url: str | None = None
    profile: Literal["development", "testing", "staging", "production"] = "development"
    config_file: str | None = None
    prefix: str = "valkyrie"
    data_dir: str | None = None
    embedded_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 4222
    storage: Literal["file", "memory"] = "file"
    replicas: Annotated[int, msgspec.Meta(ge=1, le=5)] = 1
    metrics_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 9464
    metrics_host: str = "127.0.0.1"
    submission_max_bytes: Annotated[int, msgspec.Meta(ge=1024, le=64 * 1024 * 1024)] = 1024 * 1024
    events_max_age_s: Annotated[int, msgspec.Meta(ge=1)] = 7 * 24 * 3600
    events_max_bytes: Annotated[int, msgspec.Meta(ge=1024 * 1024)] = 1024 * 1024 * 1024
    logs_max_age_s: Annotated[int, msgspec.Meta(ge=1)] = 7 * 24 * 3600
    dead_max_age_s: Annotated[int, msgspec.Meta(ge=1)] = 30 * 24 * 3600
    duplicate_window_s: Annotated[int, msgspec.Meta(ge=1, le=24 * 3600)] = 120
    max_deliver: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 5
    ack_wait_s: Annotated[float, msgspec.Meta(ge=0.5, le=3600)] = 30.0
    handler_concurrency: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 64
    connect_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=600)] = 10.0
    accept_timeout_ms: Annotated[int, msgspec.Meta(ge=50, le=600_000)] = 5000
    runner_lost_after_ms: Annotated[int, msgspec.Meta(ge=100, le=3_600_000)] = 3000
    reconcile_interval_ms: Annotated[int, msgspec.Meta(ge=50, le=600_000)] = 1000
    supervise_interval_ms: Annotated[int, msgspec.Meta(ge=20, le=60_000)] = 250
    execution_grace_ms: Annotated[int, msgspec.Meta(ge=0, le=3_600_000)] = 5000
    cancel_grace_s: Annotated[float, msgspec.Meta(ge=0, le=3600)] = 10.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from ``VALKYRIE_*`` variables, then ``overrides`` (``None`` values skipped).

        Only variables naming a field are read (other ``VALKYRIE_*`` names belong to the runtime
        config's env layer); an unknown override or a bad value raises :class:`ConfigError`.
        """
        env = os.environ if environ is None else environ
        names = {f.name for f in msgspec.structs.fields(cls)}
        raw: dict[str, Any] = {}
        for key, value in env.items():
            if not key.startswith(_ENV_PREFIX):
                continue
            name = key[len(_ENV_PREFIX) :].lower()
            if name in names:
                raw[name] = value
        raw.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return msgspec.convert(raw, cls, strict=False)
        except msgspec.ValidationError as e:
            raise ConfigError(f"invalid setting: {e} (check the VALKYRIE_* variables)") from e
