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
from valkyrie.config.model import ValkyrieConfig
from valkyrie.config.settings import Settings
from valkyrie.errors import BusError, ConnectError

__all__ = ["BUCKETS", "Bus", "connect"]

log = logging.getLogger("valkyrie.bus")

#: bucket name -> (history, ttl seconds or None)
BUCKETS: dict[str, tuple[int, float | None]] = {
    "jobs": (1, None),
    "runners": (1, None),
    "idempotency": (1, 7 * 24 * 3600.0),
    "config": (64, None),
    "stats": (1, None),
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
        """The KV bucket ``name`` (``jobs``, ``runners``, ``idempotency``, ``config``, ``stats``)."""
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
        """The configuration of every stream Valkyrie uses (retention of events from ``config``)."""
        s, n = self.settings, self.names
        common: dict[str, Any] = {
            "storage": self._storage(),
            "num_replicas": s.replicas,
            "duplicate_window": float(s.duplicate_window_s),
        }
        week = 7 * 24 * 3600.0
        return [
            StreamConfig(
                name=n.stream("submit"),
                subjects=[n.submit, n.submit_as("*")],
                retention=RetentionPolicy.WORK_QUEUE,
                max_age=week,
                **common,
            ),
            StreamConfig(
                name=n.stream("commands"),
                subjects=[n.cancel, n.cancel_as("*"), n.config_change, n.config_change_as("*")],
                retention=RetentionPolicy.WORK_QUEUE,
                max_age=week,
                **common,
            ),
            StreamConfig(
                name=n.stream("updates"),
                subjects=[n.updates("*")],
                retention=RetentionPolicy.WORK_QUEUE,
                max_age=week,
                **common,
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
                max_bytes=s.events_max_bytes,
                **common,
            ),
            StreamConfig(
                # audit events: their own stream, so that nothing else can push them out
                name=n.stream("audit"),
                subjects=[n.audit(">")],
                retention=RetentionPolicy.LIMITS,
                discard=DiscardPolicy.OLD,
                max_age=float(s.dead_max_age_s),
                max_bytes=s.events_max_bytes,
                **common,
            ),
            StreamConfig(
                name=n.stream("dead"),
                subjects=[n.dead(">")],
                retention=RetentionPolicy.LIMITS,
                discard=DiscardPolicy.OLD,
                max_age=float(s.dead_max_age_s),
                **common,
            ),
        ]

    async def provision(self, config: ValkyrieConfig) -> None:
        """Create or update every stream and bucket; safe to run any number of times, concurrently.

        ``config`` is the process's runtime config (the provisioning values that are runtime keys,
        such as ``observability.events_max_age_s``, come from it).
        """
        try:
            for stream in self.stream_configs(config):
                await self._ensure_stream(stream)
            for name, (history, ttl) in BUCKETS.items():
                await self._ensure_bucket(name, history, ttl)
        except nats.errors.Error as e:
            raise BusError(f"provisioning JetStream failed: {e!r} (is JetStream enabled?)") from e

    async def _ensure_stream(self, config: StreamConfig) -> None:
        try:
            await self.js.add_stream(config)
        except nats.js.errors.BadRequestError as e:
            # 10058: the name is in use with another config (e.g. a changed retention window)
            if e.err_code != 10058:
                raise
            await self.js.update_stream(config)

    async def _ensure_bucket(self, name: str, history: int, ttl: float | None) -> None:
        config = KeyValueConfig(
            bucket=self.names.bucket(name),
            history=history,
            ttl=ttl,
            storage=self._storage(),
            replicas=self.settings.replicas,
            direct=True,
        )
        try:
            self._kv[name] = await self.js.create_key_value(config)
        except nats.js.errors.BadRequestError as e:
            if e.err_code != 10058:
                raise
            # It exists with other settings (say replicas 1 -> 3): update its stream in place.
            stream = f"KV_{self.names.bucket(name)}"
            current = (await self.js.stream_info(stream)).config
            wanted = current.evolve(
                num_replicas=self.settings.replicas,
                max_msgs_per_subject=history,
                max_age=ttl,
            )
            if wanted.as_dict() != current.as_dict():
                await self.js.update_stream(wanted)
            self._kv[name] = await self.js.key_value(self.names.bucket(name))

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
    auth = creds.options()
    target = url or settings.nats_url
    if not target:
        raise ConnectError("no NATS URL: set VALKYRIE_NATS_URL or let `valkyrie up` embed a server")
    servers = [u.strip() for u in target.split(",") if u.strip()]
    holder: list[NatsClient] = []

    def closing() -> bool:
        return bool(holder) and (holder[0].is_closed or holder[0].is_draining)

    last_error: list[Exception] = []
    refusals = [0]
    attempt_scope: list[anyio.CancelScope] = []

    async def _on_error(e: Exception) -> None:
        last_error[:] = [e]
        if not holder:
            # before the first connection succeeds, the final ConnectError says it all; a
            # refusal will not change by trying again (nats-py would, for ever)
            if _refused(e) and attempt_scope:
                attempt_scope[0].cancel()
            return
        if closing():
            return
        if _refused(e):
            # A rotated seed is read again at the next reconnect and works; a revoked identity
            # is refused for good: stop trying instead of reconnecting for ever.
            refusals[0] += 1
            if refusals[0] >= _REFUSALS_BEFORE_CLOSING:
                log.error("NATS refuses %s (revoked?): closing the connection", creds.describe())
                asyncio.get_running_loop().create_task(holder[0].close())
                return
        log.warning("NATS error: %r", e)

    async def _on_disconnect() -> None:
        if not closing():
            log.warning("disconnected from NATS; reconnecting")

    async def _on_reconnect() -> None:
        refusals[0] = 0
        log.info("reconnected to NATS")

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
                attempt_scope[:] = [scope]
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
                    error_cb=_on_error,
                    disconnected_cb=_on_disconnect,
                    reconnected_cb=_on_reconnect,
                    **auth,
                )
                holder[:] = [nc]
            if scope.cancelled_caught:
                raise nats.errors.Error(str(last_error[0]) if last_error else "refused")
    except (nats.errors.NoServersError, OSError, TimeoutError) as e:
        raise ConnectError(
            f"cannot connect to NATS at {target} within {settings.connect_timeout_s:g}s "
            f"({last_error[0] if last_error else e!r}): "
            "check that the server runs and the URL (VALKYRIE_NATS_URL) is right"
        ) from e
    except nats.errors.Error as e:
        if not _refused(e):
            raise
        raise ConnectError(
            f"NATS at {target} refused {creds.describe()}: "
            + (
                "check the credentials (VALKYRIE_NATS_CREDS, or the generated ones in the data "
                "dir: `valkyrie auth ls`)"
                if creds.authenticated
                else "it requires credentials: set VALKYRIE_NATS_CREDS, or run this on the host "
                "of `valkyrie up`, which finds the generated ones in its data dir"
            )
        ) from e
    return Bus(
        nc=nc,
        js=nc.jetstream(),
        names=Names(settings.prefix),
        settings=settings,
        identity=creds.identity,
    )
