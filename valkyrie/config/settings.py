"""Process settings: how to reach NATS and how to provision it.

Read from ``VALKYRIE_*`` environment variables over the defaults below; unknown keys are refused.
Everything that can be tuned is a runtime-config key (valkyrie/config/model.py), not a setting.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import platformdirs

from valkyrie.errors import ConfigError

__all__ = ["Settings", "data_dir_of"]

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
        data_dir: where the embedded server keeps its store and ``valkyrie auth`` its identities
            (``auth/``); ``None`` = the user data directory.
        embedded_host: the address the embedded server listens on (loopback by default).
        embedded_port: client port of the embedded server.
        embedded_auth: secure the embedded server with the generated identities (``valkyrie
            auth init`` on first start); ``false`` runs it open, for development only.
        nats_creds: NATS credentials file: an nkey seed (``<identity>.nk``) or a JWT ``.creds``.
        nats_user: NATS user name (with ``nats_password``).
        nats_password: NATS password.
        nats_token: NATS authentication token.
        nats_identity: the identity this process speaks as (its subjects and inbox
            ``_INBOX_<identity>``); by default the credentials file's name, else the command's
            own (``admin`` for the CLI).
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
    embedded_host: str = "127.0.0.1"
    embedded_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 4222
    embedded_auth: bool = True
    nats_creds: str | None = None
    nats_user: str | None = None
    nats_password: str | None = None
    nats_token: str | None = None
    nats_identity: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_\-]{1,128}$")] | None = None
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


def data_dir_of(settings: Settings) -> Path:
    """The data directory: ``settings.data_dir``, else the user data directory."""
    if settings.data_dir:
        return Path(settings.data_dir).expanduser()
    return Path(platformdirs.user_data_dir("valkyrie", appauthor=False))
