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

__all__ = ["Settings", "data_dir_of", "redact_url"]

_ENV_PREFIX = "VALKYRIE_"
MiB = 1024 * 1024
GiB = 1024 * MiB
#: a stream's or bucket's size limit: at least 1 MiB (the server reserves it in its store)
Bytes = Annotated[int, msgspec.Meta(ge=MiB)]


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
        events_max_bytes: how many bytes of events are kept (the oldest go first).
        logs_max_bytes: how many bytes of job logs are kept (the oldest go first); a stream of
            its own, so that logs never push events out.
        logs_max_msgs_per_job: log messages kept per job (and runner): the server's own bound on
            one job's log, whatever its runner does (the oldest of that job go first).
        logs_max_age_s: how long job logs are kept.
        dead_max_age_s: how long dead letters are kept.
        audit_max_age_s: how long audit events are kept (a stream of their own, written only by
            the control plane and the gateway, so nothing else can push them out).
        audit_max_bytes: how many bytes of audit events are kept (the oldest go first).
        submit_max_bytes: pending submissions; when full, submitting is refused (none is dropped).
        commands_max_bytes: pending cancels and config changes; when full, new ones are refused.
        updates_max_bytes: runner updates not yet applied; when full, runners retry.
        dead_max_bytes: dead letters; when full, new ones are refused (the message stays where
            it was, unacknowledged) rather than old ones dropped.
        jobs_max_bytes: the jobs bucket; when full, intake refuses new jobs (jobs already
            accepted go on: rewriting a record never needs more room than it had).
        runners_max_bytes: the runners bucket.
        idempotency_max_bytes: the idempotency bucket.
        config_max_bytes: the config bucket (every kept revision).
        stats_max_bytes: the stats bucket (health summary, fallback record, queue ledger).
        secrets_max_bytes: the secrets bucket (jobs' secret environment values until they end).
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
    events_max_bytes: Bytes = GiB
    logs_max_bytes: Bytes = GiB
    logs_max_msgs_per_job: Annotated[int, msgspec.Meta(ge=100)] = 100_000
    logs_max_age_s: Annotated[int, msgspec.Meta(ge=1)] = 7 * 24 * 3600
    dead_max_age_s: Annotated[int, msgspec.Meta(ge=1)] = 30 * 24 * 3600
    audit_max_age_s: Annotated[int, msgspec.Meta(ge=1)] = 90 * 24 * 3600
    audit_max_bytes: Bytes = 256 * MiB
    submit_max_bytes: Bytes = 256 * MiB
    commands_max_bytes: Bytes = 64 * MiB
    updates_max_bytes: Bytes = 256 * MiB
    dead_max_bytes: Bytes = 256 * MiB
    jobs_max_bytes: Bytes = GiB
    runners_max_bytes: Bytes = 64 * MiB
    idempotency_max_bytes: Bytes = 256 * MiB
    config_max_bytes: Bytes = 64 * MiB
    stats_max_bytes: Bytes = 64 * MiB
    secrets_max_bytes: Bytes = 256 * MiB
    duplicate_window_s: Annotated[int, msgspec.Meta(ge=1, le=24 * 3600)] = 120

    def max_bytes(self, name: str) -> int:
        """The size limit of stream or bucket ``name`` (``submit``, ``events``, ``jobs`` …)."""
        return int(getattr(self, f"{name}_max_bytes"))

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


def redact_url(url: str) -> str:
    """``url`` (or comma-separated URLs) with any credentials in it replaced by ``***``.

    ``nats://user:password@host:4222`` and ``nats://token@host`` become ``nats://***@host:4222``
    and ``nats://***@host``: what every message, log line and health report shows of a URL.
    """
    return ",".join(_redact_one(part) for part in url.split(","))


def _redact_one(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    authority, slash, path = rest.partition("/")
    if "@" not in authority:
        return url
    host = authority.rpartition("@")[2]
    return f"{scheme}{sep}***@{host}{slash}{path}"


def data_dir_of(settings: Settings) -> Path:
    """The data directory: ``settings.data_dir``, else the user data directory."""
    if settings.data_dir:
        return Path(settings.data_dir).expanduser()
    return Path(platformdirs.user_data_dir("valkyrie", appauthor=False))
