"""Process settings: how to reach NATS and how to provision it.

Read from ``VALKYRIE_*`` environment variables over the defaults below; unknown keys are refused.
Everything that can be tuned is a runtime-config key (valkyrie/config/model.py), not a setting.
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
    """Settings every Valkyrie process shares: how to reach NATS and how to provision it.

    Every tunable (timings, limits, sizes, metrics endpoint …) is a key of the runtime config
    (:class:`~valkyrie.config.model.ValkyrieConfig`) instead; its flat legacy variable
    (``VALKYRIE_ACK_WAIT_S`` …) is an alias read by the config's ``env`` layer
    (:data:`~valkyrie.config.load.LEGACY_ENV`).

    Attributes:
        nats_url: NATS server URL(s), comma separated; ``None`` starts an embedded nats-server.
        profile: environment profile of the runtime config (docs/configuration.md).
        config_file: TOML file layered over the profile.
        prefix: subject prefix and stream/bucket name prefix.
        data_dir: where the embedded server keeps its store; ``None`` = the user data directory.
        embedded_port: client port of the embedded server.
        storage: JetStream storage for streams and buckets.
        replicas: stream/bucket replica count (1 for one server, 3 for a cluster).
        connect_timeout_s: how long to keep trying to connect at start-up.
        events_max_bytes: how many bytes of events are kept (also the logs stream's limit).
        logs_max_age_s: how long job logs are kept.
        dead_max_age_s: how long dead letters are kept.
        duplicate_window_s: how long ``Nats-Msg-Id`` de-duplicates publishes.
    """

    nats_url: str | None = None
    profile: Literal["development", "testing", "staging", "production"] = "development"
    config_file: str | None = None
    prefix: str = "valkyrie"
    data_dir: str | None = None
    embedded_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 4222
    storage: Literal["file", "memory"] = "file"
    replicas: Annotated[int, msgspec.Meta(ge=1, le=5)] = 1
    connect_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=600)] = 10.0
    events_max_bytes: Annotated[int, msgspec.Meta(ge=1024 * 1024)] = 1024 * 1024 * 1024
    logs_max_age_s: Annotated[int, msgspec.Meta(ge=1)] = 7 * 24 * 3600
    dead_max_age_s: Annotated[int, msgspec.Meta(ge=1)] = 30 * 24 * 3600
    duplicate_window_s: Annotated[int, msgspec.Meta(ge=1, le=24 * 3600)] = 120

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
