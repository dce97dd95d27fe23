"""Connection to NATS and idempotent provisioning of Valkyrie's streams and KV buckets."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from dataclasses import dataclass, field
from typing import Any

import anyio
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.api import (
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.kv import KeyValue
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential,
)

from valkyrie.bus.credentials import Credentials
from valkyrie.bus.names import Names
from valkyrie.bus.storage import provisioning
from valkyrie.config.model import ValkyrieConfig
from valkyrie.config.settings import Settings, redact_url
from valkyrie.errors import BusError, ConnectError

__all__ = ["BUCKETS", "Bus", "connect"]

log = logging.getLogger("valkyrie.bus")

#: bucket name -> (history, ttl seconds or None); the size limit of each is a setting
#: (``<name>_max_bytes``), the secrets bucket's TTL the jobs' retention (``limits.job_retention_s``)
BUCKETS: dict[str, tuple[int, float | None]] = {
    "jobs": (1, None),
    "runners": (1, None),
    "idempotency": (1, 7 * 24 * 3600.0),
    "config": (64, None),
    "stats": (1, None),
    "secrets": (1, None),
}
#: what the server answers a connection whose credentials it does not accept
_REFUSED = ("authorization violation", "authentication", "user authentication expired")
#: refusals in a row after which a connection that worked gives up reconnecting
_REFUSALS_BEFORE_CLOSING = 3


async def _connect(nc: NatsClient, **options: Any) -> None:
    """``nc.connect``, closing what a failed attempt leaves open.

    A refused attempt leaves its socket open: ``nats.connect`` only drops the client.
    """
    try:
        await nc.connect(**options)
    except BaseException:
        with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
            await nc.close()
            # a close interrupted by our cancellation (a refusal) leaves the socket closing:
            # wait for it, or it is collected unclosed
            transport = nc._transport
            if transport is not None:
                transport.close()
                await transport.wait_closed()
        raise


def _refused(e: Exception) -> bool:
    """Whether ``e`` is the server refusing the connection's credentials."""
    return any(r in str(e).lower() for r in _REFUSED)


@dataclass
class Bus:
    """A connected NATS client, its JetStream context, and Valkyrie's names and buckets.

    ``identity`` is who the connection speaks as (``None``: an open installation's anonymous
    connection): the identity-bearing subjects (``jobs.submit.<identity>``) and the inbox prefix
    ``_INBOX_<identity>`` are its.
    """

    nc: NatsClient
    js: JetStreamContext
    names: Names
    settings: Settings
    identity: str | None = None
    _kv: dict[str, KeyValue] = field(default_factory=dict)

    async def kv(self, name: str) -> KeyValue:
        """The KV bucket ``name`` (one of :data:`BUCKETS`)."""
        bucket = self._kv.get(name)
        if bucket is None:
            try:
                bucket = await self.js.key_value(self.names.bucket(name))
            except nats.js.errors.BucketNotFoundError as e:
                raise BusError(
                    f"KV bucket {self.names.bucket(name)!r} does not exist: run `valkyrie up` "
                    "or `valkyrie provision` first"
                ) from e
            self._kv[name] = bucket
        return bucket

    def _storage(self) -> StorageType:
        return StorageType.FILE if self.settings.storage == "file" else StorageType.MEMORY

    def stream_configs(self, config: ValkyrieConfig) -> list[StreamConfig]:
        """The configuration of every stream Valkyrie uses (retention of events from ``config``).

        Every stream has a size limit (a setting). The work queues and the dead letters refuse
        new messages when full (``discard: new``): dropping the oldest would lose a submission,
        command, update or dead letter already acknowledged. Events and logs drop their oldest,
        each in a stream of its own, so that logs never push out events.
        """
        s, n = self.settings, self.names
        common: dict[str, Any] = {
            "storage": self._storage(),
            "num_replicas": s.replicas,
            "duplicate_window": float(s.duplicate_window_s),
        }
        week = 7 * 24 * 3600.0
        queue: dict[str, Any] = {
            "retention": RetentionPolicy.WORK_QUEUE,
            "discard": DiscardPolicy.NEW,
            "max_age": week,
            **common,
        }
        return [
            StreamConfig(
                name=n.stream("submit"),
                subjects=[n.submit, n.submit_as("*")],
                max_bytes=s.submit_max_bytes,
                **queue,
            ),
            StreamConfig(
                name=n.stream("commands"),
                subjects=[n.cancel, n.cancel_as("*"), n.config_change, n.config_change_as("*")],
                max_bytes=s.commands_max_bytes,
                **queue,
            ),
            StreamConfig(
                name=n.stream("updates"),
                subjects=[n.updates("*")],
                max_bytes=s.updates_max_bytes,
                **queue,
            ),
            StreamConfig(
                name=n.stream("events"),
                subjects=[n.events(">")],
                retention=RetentionPolicy.LIMITS,
                discard=DiscardPolicy.OLD,
                max_age=float(config.observability.events_max_age_s),
                max_bytes=s.events_max_bytes,
                **common,
            ),
            StreamConfig(
                name=n.stream("logs"),
                subjects=[n.logs("*", "*")],
                retention=RetentionPolicy.LIMITS,
                discard=DiscardPolicy.OLD,
                max_age=float(s.logs_max_age_s),
                max_bytes=s.logs_max_bytes,
                max_msgs_per_subject=s.logs_max_msgs_per_job,
                **common,
            ),
            StreamConfig(
                # audit events: their own stream, so that nothing else can push them out
                name=n.stream("audit"),
                subjects=[n.audit(">")],
                retention=RetentionPolicy.LIMITS,
                discard=DiscardPolicy.OLD,
                max_age=float(s.audit_max_age_s),
                max_bytes=s.audit_max_bytes,
                **common,
            ),
            StreamConfig(
                name=n.stream("dead"),
                subjects=[n.dead(">")],
                retention=RetentionPolicy.LIMITS,
                discard=DiscardPolicy.NEW,
                max_age=float(s.dead_max_age_s),
                max_bytes=s.dead_max_bytes,
                **common,
            ),
        ]

    def bucket_configs(self, config: ValkyrieConfig) -> dict[str, KeyValueConfig]:
        """The configuration of every KV bucket by short name (the secrets TTL from ``config``)."""
        configs = {}
        for name, (history, ttl) in BUCKETS.items():
            if name == "secrets":
                # a job's secret values are kept no longer than the record of a job that ended
                ttl = float(config.limits.job_retention_s)
            configs[name] = KeyValueConfig(
                bucket=self.names.bucket(name),
                history=history,
                ttl=ttl,
                max_bytes=self.settings.max_bytes(name),
                storage=self._storage(),
                replicas=self.settings.replicas,
                direct=True,
            )
        return configs

    async def provision(self, config: ValkyrieConfig) -> None:
        """Create or update every stream and bucket; safe to run any number of times, concurrently.

        ``config`` is the process's runtime config (the provisioning values that are runtime keys,
        such as ``observability.events_max_age_s``, come from it).

        Raises:
            BusError: naming the stream or bucket that could not be provisioned and why (a
                server without room for its size limit: which setting to lower).
        """
        for stream in self.stream_configs(config):
            name = stream.name or ""
            # <PREFIX>_<NAME>: the name's last part is the stream's short name
            with provisioning(name, name.rpartition("_")[2].lower(), stream.max_bytes):
                await self._ensure_stream(stream)
        for short, bucket in self.bucket_configs(config).items():
            with provisioning(f"KV_{bucket.bucket}", short, bucket.max_bytes):
                self._kv[short] = await self._ensure_bucket(bucket)

    async def _ensure_stream(self, config: StreamConfig) -> None:
        try:
            await self.js.add_stream(config)
        except nats.js.errors.BadRequestError as e:
            # 10058: the name is in use with another config (e.g. a changed retention window)
            if e.err_code != 10058:
                raise
            await self.js.update_stream(config)

    async def _ensure_bucket(self, config: KeyValueConfig) -> KeyValue:
        try:
            return await self.js.create_key_value(config)
        except nats.js.errors.BadRequestError as e:
            if e.err_code != 10058:
                raise
        # It exists with other settings (say replicas 1 -> 3): update its stream in place.
        current = (await self.js.stream_info(f"KV_{config.bucket}")).config
        wanted = current.evolve(
            num_replicas=config.replicas,
            max_msgs_per_subject=config.history,
            max_age=config.ttl,
            max_bytes=config.max_bytes,
        )
        if wanted.as_dict() != current.as_dict():
            await self.js.update_stream(wanted)
        return await self.js.key_value(config.bucket)

    async def close(self) -> None:
        """Drain and close the connection (in-flight publishes are flushed)."""
        if self.nc.is_closed:
            return
        try:
            await self.nc.drain()
        except (nats.errors.Error, OSError) as e:
            log.debug("drain failed, closing: %r", e)
            try:
                await self.nc.close()
            except (nats.errors.Error, OSError, RuntimeError) as e2:
                # nats-py closing while it reconnects can write to a closed transport
                # (RuntimeError from uvloop): the connection is gone either way
                log.debug("close failed: %r", e2)


class _Watch:
    """The connection's callbacks: what went wrong last, and when to stop trying."""

    def __init__(self, creds: Credentials) -> None:
        self.creds = creds
        self.nc: NatsClient | None = None  # set once the first connection succeeded
        self.last_error: Exception | None = None
        self.attempt: anyio.CancelScope | None = None
        self._refusals = 0

    def _closing(self) -> bool:
        return self.nc is not None and (self.nc.is_closed or self.nc.is_draining)

    async def on_error(self, e: Exception) -> None:
        self.last_error = e
        if self.nc is None:
            # before the first connection succeeds, the final ConnectError says it all; a
            # refusal will not change by trying again (nats-py would, for ever)
            if _refused(e) and self.attempt is not None:
                self.attempt.cancel()
            return
        if self._closing():
            return
        if _refused(e):
            # A rotated seed is read again at the next reconnect and works; a revoked identity
            # is refused for good: stop trying instead of reconnecting for ever.
            self._refusals += 1
            if self._refusals >= _REFUSALS_BEFORE_CLOSING:
                log.error(
                    "NATS refuses %s (revoked?): closing the connection", self.creds.describe()
                )
                asyncio.get_running_loop().create_task(self.nc.close())
                return
        log.warning("NATS error: %r", e)

    async def on_disconnect(self) -> None:
        if not self._closing():
            log.warning("disconnected from NATS; reconnecting")

    async def on_reconnect(self) -> None:
        self._refusals = 0
        log.info("reconnected to NATS")


def _refusal(target: str, creds: Credentials) -> ConnectError:
    """What to say when the server refused who connects."""
    return ConnectError(
        f"NATS at {redact_url(target)} refused {creds.describe()}: "
        + (
            "check the credentials (VALKYRIE_NATS_CREDS, or the generated ones in the data "
            "dir: `valkyrie auth ls`)"
            if creds.authenticated
            else "it requires credentials: set VALKYRIE_NATS_CREDS, or run this on the host "
            "of `valkyrie up`, which finds the generated ones in its data dir"
        )
    )


async def connect(
    settings: Settings,
    *,
    url: str | None = None,
    name: str = "valkyrie",
    tls: ssl.SSLContext | None = None,
    credentials: Credentials | None = None,
) -> Bus:
    """Connect to NATS (retrying until ``settings.connect_timeout_s``) and return a :class:`Bus`.

    ``tls`` is the client TLS context, ``None`` for a plain connection; the caller builds it from
    its loaded config (:func:`valkyrie.bus.tls.tls_context` of the ``security`` section): this
    reads no config. ``credentials`` say who connects (default: what the settings name,
    :meth:`Credentials.from_settings`).

    Raises:
        ConnectError: when no server answered in time, or it refused the credentials; the
            message names the URL and what to check.
    """
    creds = credentials if credentials is not None else Credentials.from_settings(settings)
    target = url or settings.nats_url
    if not target:
        raise ConnectError("no NATS URL: set VALKYRIE_NATS_URL or let `valkyrie up` embed a server")
    servers = [u.strip() for u in target.split(",") if u.strip()]
    watch = _Watch(creds)
    try:
        async for attempt in AsyncRetrying(
            stop=stop_after_delay(settings.connect_timeout_s),
            wait=wait_exponential(multiplier=0.05, max=1.0),
            retry=retry_if_exception_type((nats.errors.NoServersError, OSError, TimeoutError)),
            reraise=True,
        ):
            with (
                attempt,
                anyio.fail_after(max(2.0, settings.connect_timeout_s)),
                anyio.CancelScope() as scope,
            ):
                watch.attempt = scope
                # nats-py's first connect retries forever when reconnects are unlimited
                nc = NatsClient()
                await _connect(
                    nc,
                    servers=servers,
                    name=name,
                    connect_timeout=2,
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.25,
                    drain_timeout=5,
                    tls=tls,
                    error_cb=watch.on_error,
                    disconnected_cb=watch.on_disconnect,
                    reconnected_cb=watch.on_reconnect,
                    **creds.options(),
                )
                watch.nc = nc
            if scope.cancelled_caught:
                raise nats.errors.Error(str(watch.last_error or "refused"))
    except (nats.errors.NoServersError, OSError, TimeoutError) as e:
        raise ConnectError(
            f"cannot connect to NATS at {redact_url(target)} within "
            f"{settings.connect_timeout_s:g}s ({watch.last_error or repr(e)}): "
            "check that the server runs and the URL (VALKYRIE_NATS_URL) is right"
        ) from e
    except nats.errors.Error as e:
        if not _refused(e):
            raise
        raise _refusal(target, creds) from e
    return Bus(
        nc=nc,
        js=nc.jetstream(),
        names=Names(settings.prefix),
        settings=settings,
        identity=creds.identity,
    )
