"""Talking to NATS: the connection and provisioning, names, codecs, KV, acked publishes, feeds.

Every subject, stream and bucket name comes from :class:`Names`; every message is encoded and
decoded with the codecs built once in :mod:`valkyrie.bus.codec`. The embedded nats-server manager
is :mod:`valkyrie.bus.server`, imported on demand (a runner host never loads it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from valkyrie._lazy import attach as _attach

if TYPE_CHECKING:
    from valkyrie.bus.acked import (
        AckedPublisher,
        PubAck,
        acked_publisher,
    )
    from valkyrie.bus.codec import (
        ANY_DECODER,
        CONFIG_REVISION_DECODER,
        DEAD_DECODER,
        DISPATCH_DECODER,
        ENCODER,
        EVENT_DECODER,
        HEARTBEAT_DECODER,
        JOB_DECODER,
        LOG_DECODER,
        REGISTRATION_DECODER,
        RUNNER_DECODER,
        UPDATE_DECODER,
        VERDICT_DECODER,
        encode,
        new_id,
        now_ms,
    )
    from valkyrie.bus.connection import (
        BUCKETS,
        Bus,
        connect,
    )
    from valkyrie.bus.credentials import (
        JWT_MARKER,
        Credentials,
        auth_dir,
        creds_path,
        discover,
    )
    from valkyrie.bus.events import (
        EventPublisher,
    )
    from valkyrie.bus.kv import (
        KvChange,
        Versioned,
        cas_update,
        get_versioned,
        kv_create,
        kv_write,
        put_new,
        watch_kv,
    )
    from valkyrie.bus.names import (
        Names,
    )
    from valkyrie.bus.outbox import (
        Outbox,
    )
    from valkyrie.bus.pullfeed import (
        PullFeed,
        ensure_consumer,
    )
    from valkyrie.bus.server import (
        NatsServer,
        find_nats_server,
        reload_running,
    )
    from valkyrie.bus.snapshot import (
        Stored,
        read_stored,
    )
    from valkyrie.bus.storage import (
        full_error,
        provisioning,
        storage_full,
    )
    from valkyrie.bus.tls import (
        tls_context,
    )

if not TYPE_CHECKING:  # type checkers see the imports above, and no catch-all __getattr__
    __getattr__, __dir__ = _attach(__name__, __file__)

__all__ = [
    "ANY_DECODER",
    "BUCKETS",
    "CONFIG_REVISION_DECODER",
    "DEAD_DECODER",
    "DISPATCH_DECODER",
    "ENCODER",
    "EVENT_DECODER",
    "HEARTBEAT_DECODER",
    "JOB_DECODER",
    "JWT_MARKER",
    "LOG_DECODER",
    "REGISTRATION_DECODER",
    "RUNNER_DECODER",
    "UPDATE_DECODER",
    "VERDICT_DECODER",
    "AckedPublisher",
    "Bus",
    "Credentials",
    "EventPublisher",
    "KvChange",
    "Names",
    "NatsServer",
    "Outbox",
    "PubAck",
    "PullFeed",
    "Stored",
    "Versioned",
    "acked_publisher",
    "auth_dir",
    "cas_update",
    "connect",
    "creds_path",
    "discover",
    "encode",
    "ensure_consumer",
    "find_nats_server",
    "full_error",
    "get_versioned",
    "kv_create",
    "kv_write",
    "new_id",
    "now_ms",
    "provisioning",
    "put_new",
    "read_stored",
    "reload_running",
    "storage_full",
    "tls_context",
    "watch_kv",
]
