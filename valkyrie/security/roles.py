"""The permission table: every role's exact publish and subscribe allow lists on NATS.

One table, rendered into the nats-server config (:mod:`valkyrie.security.natsconf`) and into
docs/security.md (:mod:`valkyrie.security.doc`). Each list is the smallest that works: the
``$JS.API`` requests of the consumers, streams and buckets a role uses, the ``$KV`` subjects of
the buckets it writes, the ``$JS.ACK`` subjects of its own durable consumers, the ``$JS.FC``
flow-control replies of its watches, and the subjects that carry its own identity.

Facts the table relies on (nats-server 2.10+, nats-py):

* a KV read is a direct get (``$JS.API.DIRECT.GET.KV_<bucket>.$KV.<bucket>.<key>``), after one
  ``STREAM.INFO`` when the bucket is opened; a KV write publishes on ``$KV.<bucket>.<key>``;
* a watch (and ``history``, ``keys``, reading a whole bucket or a window of events) is an
  ordered push consumer created without a name (``$JS.API.CONSUMER.CREATE.<stream>``), acked by
  nobody, with flow-control replies on ``$JS.FC.<stream>.>`` and one ``CONSUMER.INFO``; the
  server refuses a durable name on that subject, so a reader cannot take over a handler's durable
  consumer through it, and readers get no ``MSG.NEXT`` or ``$JS.ACK`` at all;
* a durable pull consumer needs its own ``CONSUMER.INFO|CREATE|DURABLE.CREATE``, ``MSG.NEXT``
  and ``$JS.ACK.<stream>.<durable>.>``: nobody else gets those of a handler's consumer;
* replies come on the requester's inbox ``_INBOX_<identity>.>``, the only inbox it may read.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from valkyrie.bus.names import Names
from valkyrie.domain.identity import inbox_prefix
from valkyrie.errors import ConfigError

__all__ = [
    "CONTROL_PLANE",
    "HANDLER_ROLES",
    "ROLES",
    "STREAMS",
    "Permissions",
    "permissions",
    "role_of",
]

API = "$JS.API"
#: every stream Valkyrie provisions (short names, see :meth:`Names.stream`)
STREAMS = ("submit", "commands", "updates", "events", "logs", "dead", "audit")
#: every KV bucket (see :meth:`Names.bucket`); ``secrets`` holds job secrets (dispatcher only)
BUCKETS = ("jobs", "runners", "idempotency", "config", "stats", "secrets")

#: the roles a handler of the same name runs as
HANDLER_ROLES = (
    "intake",
    "dispatcher",
    "results",
    "registry",
    "supervisor",
    "canceller",
    "config",
    "monitor",
)
#: roles that may publish audit events: the control plane and the gateway
CONTROL_PLANE = (*HANDLER_ROLES, "gateway")

#: every role and what it is for (the docs table's first column)
ROLES: dict[str, str] = {
    "provisioner": "creates and updates the streams and buckets (`valkyrie up`, `provision`)",
    "intake": "the intake handler",
    "dispatcher": "the dispatcher handler (the only reader of job secrets)",
    "results": "the results handler",
    "registry": "the registry handler",
    "supervisor": "the supervisor handler",
    "canceller": "the canceller handler",
    "config": "the config handler (the only writer of the config bucket)",
    "monitor": "the monitor handler",
    "gateway": "the HTTP gateway, acting for the HTTP caller its token proves",
    "admin": "the operator's CLI: submit, cancel, config, runner admin, dead letters",
    "ops": "read-only: health, events, runners, jobs, config, stats (never secrets)",
    "submitter": "one per `valkyrie auth submitter NAME`: submits, cancels its jobs, reads jobs",
    "runner": "one per `valkyrie auth runner ID`: only its own subjects, no JetStream API",
}
#: identities that may change the config (their inboxes get the config handler's verdicts)
CONFIG_CHANGERS = ("admin", "gateway", "monitor")


@dataclass(frozen=True)
class Permissions:
    """One identity's allow lists (everything else is denied)."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    allow_responses: bool = False
    #: why some entries are there, for the docs (entry -> note)
    notes: dict[str, str] = field(default_factory=dict)


class _Lists:
    """Builds one role's lists, keeping each entry once, in order."""

    def __init__(self, names: Names) -> None:
        self.n = names
        self.pub: dict[str, None] = {}
        self.sub: dict[str, None] = {}

    def publish(self, *subjects: str) -> None:
        self.pub.update(dict.fromkeys(subjects))

    def subscribe(self, *subjects: str) -> None:
        self.sub.update(dict.fromkeys(subjects))

    def stream_info(self, short: str) -> None:
        self.publish(f"{API}.STREAM.INFO.{self.n.stream(short)}")

    def kv_read(self, bucket: str) -> None:
        """Open the bucket and read keys by direct get."""
        stream = f"KV_{self.n.bucket(bucket)}"
        self.publish(f"{API}.STREAM.INFO.{stream}", f"{API}.DIRECT.GET.{stream}.>")

    def kv_watch(self, bucket: str) -> None:
        """Watch keys (also ``history`` and ``keys``): an ordered push consumer.

        nats-py reads the watcher's consumer info once, for how many values it starts with.
        """
        self.kv_read(bucket)
        self.reader(f"KV_{self.n.bucket(bucket)}")

    def kv_write(self, bucket: str) -> None:
        """Read, create, update and delete keys (acks come on the inbox)."""
        self.kv_read(bucket)
        self.kv_put(bucket)

    def kv_put(self, bucket: str) -> None:
        """Write and delete keys without reading any (a write-only bucket: job secrets)."""
        stream = f"KV_{self.n.bucket(bucket)}"
        self.publish(f"{API}.STREAM.INFO.{stream}", f"$KV.{self.n.bucket(bucket)}.>")

    def reader(self, stream: str) -> None:
        """Ordered push consumers on ``stream`` (full name): unnamed, acked by nobody.

        nats-py reads such a consumer's info (how many messages it starts with); info on any
        consumer of the stream reveals nothing the reader may not read anyway.
        """
        self.publish(
            f"{API}.CONSUMER.CREATE.{stream}",
            f"$JS.FC.{stream}.>",
            f"{API}.CONSUMER.INFO.{stream}.*",
        )

    def durable(self, short: str, name: str) -> None:
        """The durable pull consumer ``name`` on stream ``short``: create, pull, ack."""
        s = self.n.stream(short)
        self.publish(
            f"{API}.CONSUMER.INFO.{s}.{name}",
            f"{API}.CONSUMER.CREATE.{s}.{name}",
            f"{API}.CONSUMER.CREATE.{s}.{name}.>",
            f"{API}.CONSUMER.DURABLE.CREATE.{s}.{name}",
            f"{API}.CONSUMER.MSG.NEXT.{s}.{name}",
            f"$JS.ACK.{s}.{name}.>",
        )

    def kv_put_keys(self, bucket: str, keys: str) -> None:
        """Write and delete only the keys ``keys`` (a pattern) of ``bucket``."""
        stream = f"KV_{self.n.bucket(bucket)}"
        self.publish(f"{API}.STREAM.INFO.{stream}", f"$KV.{self.n.bucket(bucket)}.{keys}")

    def msg_get(self, short: str) -> None:
        """Read single messages of stream ``short`` by sequence or last subject."""
        self.publish(f"{API}.STREAM.MSG.GET.{self.n.stream(short)}")


def role_of(identity: str) -> str:
    """The role of an identity by its name (``runner-<id>``, ``submitter-<name>``, or the role).

    Raises:
        ConfigError: the name is no role's.
    """
    for prefixed in ("runner", "submitter"):
        if identity.startswith(f"{prefixed}-") and len(identity) > len(prefixed) + 1:
            return prefixed
    if identity in ROLES and identity not in ("runner", "submitter"):
        return identity
    raise ConfigError(f"{identity!r} is no Valkyrie identity: roles are {', '.join(ROLES)}")


def permissions(
    identity: str, names: Names, *, identities: Iterable[str] = (), runner_id: str | None = None
) -> Permissions:
    """The allow lists of ``identity`` (its role from its name, see :func:`role_of`).

    ``identities`` are every identity of the installation: the handlers that send verdicts to a
    ``Valkyrie-Reply-To`` inbox may publish into the inboxes of those that may ask (and no
    other). ``runner_id`` is the runner's id for a ``runner-<id>`` identity (its name's tail by
    default).
    """
    role = role_of(identity)
    everyone = sorted(set(identities) | {identity})
    lists = _Lists(names)
    lists.subscribe(f"{inbox_prefix(identity)}.>")
    if role == "runner":
        identity = runner_id or identity.removeprefix("runner-")
    # every process answering discovery (handler processes, gateways) replies on the asker's inbox
    allow_responses = _BUILDERS[role](lists, identity, everyone) or role in CONTROL_PLANE
    return Permissions(
        publish=tuple(lists.pub), subscribe=tuple(lists.sub), allow_responses=allow_responses
    )


def _submitters(everyone: Sequence[str]) -> list[str]:
    """Identities whose submissions get a verdict on their inbox."""
    return [i for i in everyone if i in ("admin", "gateway") or i.startswith("submitter-")]


def _base(lists: _Lists, identity: str) -> None:
    """What every control-plane process shares: config and runner views, health, events.

    Also service discovery (``$SRV``): every process answers, on the asker's inbox.
    """
    n = lists.n
    lists.kv_watch("config")
    lists.kv_watch("runners")
    lists.kv_watch("stats")  # the queue ledger (intake's tenant quota) is a shared view
    lists.publish(n.health(">"), n.events(">"), n.audit(">"), n.dead(identity))
    lists.subscribe(*n.srv_subjects())


def _provisioner(lists: _Lists, identity: str, everyone: Sequence[str]) -> bool:
    n = lists.n
    lists.publish(f"{API}.INFO")  # a bucket with limit markers asks for the API level
    for short in STREAMS:
        s = n.stream(short)
        lists.publish(
            f"{API}.STREAM.INFO.{s}", f"{API}.STREAM.CREATE.{s}", f"{API}.STREAM.UPDATE.{s}"
        )
    for bucket in BUCKETS:
        s = f"KV_{n.bucket(bucket)}"
        lists.publish(
            f"{API}.STREAM.INFO.{s}", f"{API}.STREAM.CREATE.{s}", f"{API}.STREAM.UPDATE.{s}"
        )
    return False


def _intake(lists: _Lists, identity: str, everyone: Sequence[str]) -> bool:
    _base(lists, identity)
    lists.durable("submit", identity)
    lists.stream_info("submit")
    lists.kv_write("jobs")
    lists.kv_write("idempotency")
    lists.kv_put("secrets")  # stores a job's secrets; only the dispatcher reads them
    lists.publish(*(f"{inbox_prefix(i)}.>" for i in _submitters(everyone)))
    return False


def _job_writer(lists: _Lists, identity: str) -> None:
    """Handlers that move jobs and runner slots: jobs and runners buckets, runner commands."""
    _base(lists, identity)
    lists.kv_write("jobs")
    lists.kv_write("runners")
    lists.publish(lists.n.control("*"))
    lists.msg_get("updates")  # is an update of a job being taken back still unapplied?


def _dispatcher(lists: _Lists, identity: str, everyone: Sequence[str]) -> bool:
    n = lists.n
    _job_writer(lists, identity)
    lists.durable("events", identity)
    lists.msg_get("events")  # the dispatched event of a placed job (explain)
    lists.kv_write("secrets")  # the only reader: a dispatch carries them to its runner
    lists.kv_put_keys("stats", "queue.*")  # its own entry of the queue ledger
    lists.publish(n.dispatch("*"))
    lists.subscribe(n.events("job.>"), n.explain, n.queue_list)
    return True


def _results(lists: _Lists, identity: str, everyone: Sequence[str]) -> bool:
    _job_writer(lists, identity)
    lists.durable("updates", identity)
    lists.kv_put("secrets")  # deleted when the job ends
    return False


def _registry(lists: _Lists, identity: str, everyone: Sequence[str]) -> bool:
    n = lists.n
    _job_writer(lists, identity)
    lists.subscribe(
        n.register, n.register_as("*"), n.heartbeat("*"), n.deregister("*"), n.runner_admin("*")
    )
    return True


def _supervisor(lists: _Lists, identity: str, everyone: Sequence[str]) -> bool:
    _job_writer(lists, identity)
    lists.kv_put("secrets")  # deleted when the job ends
    lists.subscribe(lists.n.heartbeat("*"))
    return False


def _canceller(lists: _Lists, identity: str, everyone: Sequence[str]) -> bool:
    _job_writer(lists, identity)
    lists.durable("commands", identity)
    lists.kv_put("secrets")  # deleted when the job ends
    return False


def _config(lists: _Lists, identity: str, everyone: Sequence[str]) -> bool:
    _base(lists, identity)
    lists.durable("commands", identity)
    lists.kv_write("config")
    lists.publish(*(f"{inbox_prefix(i)}.>" for i in everyone if i in CONFIG_CHANGERS))
    return False


def _monitor(lists: _Lists, identity: str, everyone: Sequence[str]) -> bool:
    n = lists.n
    _base(lists, identity)
    lists.kv_write("stats")
    lists.subscribe(n.health(">"))
    lists.publish(n.config_change_as(identity))  # automatic fallback is a config change
    _lag_reader(lists)
    return False


def _lag_reader(lists: _Lists) -> None:
    """Stream and consumer info of every stream (backlogs, status pages)."""
    for short in STREAMS:
        s = lists.n.stream(short)
        lists.publish(f"{API}.STREAM.INFO.{s}", f"{API}.CONSUMER.INFO.{s}.*")


def _reader(lists: _Lists) -> None:
    """What every operator-facing role reads: jobs, runners, config, stats, events, logs."""
    n = lists.n
    lists.publish(n.explain)
    for bucket in ("jobs", "runners", "config", "stats", "idempotency"):
        lists.kv_watch(bucket)  # listing a bucket is a watch of every key's last value
    for short in ("events", "logs", "audit"):
        lists.reader(n.stream(short))
        lists.msg_get(short)
    lists.publish(*(f"{API}.CONSUMER.LIST.{n.stream(s)}" for s in STREAMS))  # health pages
    lists.publish(n.queue_list)  # the console's queue page: every dispatcher answers
    # `valkyrie status` and the console ask every process (service discovery)
    lists.publish(*(n.srv_subject(verb) for verb in ("PING", "INFO", "STATS")))
    _lag_reader(lists)
    lists.subscribe(n.health(">"))
    # `runners ls` shows the live heartbeat's age; a heartbeat holds no secret
    lists.subscribe(n.heartbeat("*"))


def _gateway(lists: _Lists, identity: str, everyone: Sequence[str]) -> bool:
    n = lists.n
    _reader(lists)
    lists.subscribe(*n.srv_subjects())  # a gateway answers discovery too
    lists.publish(
        n.submit_as(identity),
        n.cancel_as(identity),
        n.config_change_as(identity),
        n.runner_admin("*"),
        n.register_as("*"),  # POST /api/v2/runners/register (scope runners:admin)
        n.audit(">"),
        n.health(identity),
    )
    return False


def _admin(lists: _Lists, identity: str, everyone: Sequence[str]) -> bool:
    n = lists.n
    _reader(lists)
    lists.publish(
        n.submit_as(identity),
        n.cancel_as(identity),
        n.config_change_as(identity),
        n.runner_admin("*"),
        n.events("dead.>"),  # the dead.replayed event of a replay
        f"{API}.STREAM.MSG.DELETE.{n.stream('dead')}",
        n.updates("*"),  # replaying a runner's dead-lettered update, on its own subject
    )
    lists.msg_get("dead")
    lists.stream_info("dead")
    return False


def _ops(lists: _Lists, identity: str, everyone: Sequence[str]) -> bool:
    _reader(lists)
    lists.msg_get("dead")
    return False


def _submitter(lists: _Lists, identity: str, everyone: Sequence[str]) -> bool:
    n = lists.n
    lists.publish(n.submit_as(identity), n.cancel_as(identity), n.explain)
    for bucket in ("jobs", "config", "idempotency"):
        lists.kv_read(bucket)  # by key only: a submitter cannot list, watch or consume
    return False


def _runner(lists: _Lists, runner_id: str, everyone: Sequence[str]) -> bool:
    n = lists.n
    lists.publish(
        n.register_as(runner_id),
        n.heartbeat(runner_id),
        n.deregister(runner_id),
        n.updates(runner_id),
        n.logs(runner_id, "*"),
    )
    lists.subscribe(n.dispatch(runner_id), n.control(runner_id))
    return False


_BUILDERS = {
    "provisioner": _provisioner,
    "intake": _intake,
    "dispatcher": _dispatcher,
    "results": _results,
    "registry": _registry,
    "supervisor": _supervisor,
    "canceller": _canceller,
    "config": _config,
    "monitor": _monitor,
    "gateway": _gateway,
    "admin": _admin,
    "ops": _ops,
    "submitter": _submitter,
    "runner": _runner,
}
