"""Every subject, stream, consumer and KV bucket name, built in one place under a prefix."""

from __future__ import annotations

import re
from dataclasses import dataclass

from valkyrie.errors import ConfigError

__all__ = ["Names"]

_PREFIX = re.compile(r"^[A-Za-z0-9_\-]+$")


@dataclass(frozen=True, slots=True)
class Names:
    """Names for one Valkyrie installation; ``prefix`` (default ``valkyrie``) isolates installations.

    Subjects start with ``<prefix>.``; streams and buckets with ``<PREFIX>_`` / ``<prefix>_``.
    """

    prefix: str = "valkyrie"

    def __post_init__(self) -> None:
        if not _PREFIX.fullmatch(self.prefix):
            raise ConfigError(
                f"subject prefix {self.prefix!r} is invalid: use letters, digits, '_' or '-' "
                "(it becomes a subject token and part of stream names)"
            )

    # -- subjects -------------------------------------------------------------------------------
    @property
    def submit(self) -> str:
        """Job submissions of an open installation (no identity), captured by the submit stream.

        With NATS auth on nobody may publish here: submissions go to :meth:`submit_as`.
        """
        return f"{self.prefix}.jobs.submit"

    def submit_as(self, identity: str | None) -> str:
        """Submissions by ``identity`` (``*``: everyone's); ``None`` is :attr:`submit`."""
        return self.submit if identity is None else f"{self.submit}.{identity}"

    @property
    def cancel(self) -> str:
        """Cancel requests of an open installation, captured by the commands stream."""
        return f"{self.prefix}.jobs.cancel"

    def cancel_as(self, identity: str | None) -> str:
        """Cancel requests by ``identity`` (``*``: everyone's); ``None`` is :attr:`cancel`."""
        return self.cancel if identity is None else f"{self.cancel}.{identity}"

    def submissions(self) -> tuple[str, str]:
        """What intake takes: the legacy subject and every identity's."""
        return (self.submit, self.submit_as("*"))

    def cancels(self) -> tuple[str, str]:
        """What the canceller takes: the legacy subject and every identity's."""
        return (self.cancel, self.cancel_as("*"))

    @property
    def explain(self) -> str:
        """Request/reply: why a job is pending or where it was placed."""
        return f"{self.prefix}.jobs.explain"

    @property
    def queue_list(self) -> str:
        """Request/reply: a page of the queued jobs each dispatcher holds, with reasons."""
        return f"{self.prefix}.jobs.queue"

    @property
    def register(self) -> str:
        """Request/reply: runner registration without the id in the subject (open installations)."""
        return f"{self.prefix}.runners.register"

    def register_as(self, runner_id: str = "*") -> str:
        """Request/reply: registration of runner ``runner_id``."""
        return f"{self.register}.{runner_id}"

    def heartbeat(self, runner_id: str = "*") -> str:
        """Runner heartbeats (core NATS)."""
        return f"{self.prefix}.runners.heartbeat.{runner_id}"

    def deregister(self, runner_id: str = "*") -> str:
        """Request/reply: runner ``runner_id`` leaving cleanly."""
        return f"{self.prefix}.runners.deregister.{runner_id}"

    def runner_admin(self, action: str = "*") -> str:
        """Request/reply: drain/undrain a runner (and the operator's deregister)."""
        return f"{self.prefix}.runners.admin.{action}"

    def dispatch(self, runner_id: str) -> str:
        """Placement decisions for one runner (core NATS)."""
        return f"{self.prefix}.dispatch.{runner_id}"

    def control(self, runner_id: str) -> str:
        """Commands (cancel, abandon, drain) for one runner (core NATS)."""
        return f"{self.prefix}.control.{runner_id}"

    def updates(self, runner_id: str = "*") -> str:
        """Job updates (accepted, started, finished) from a runner, captured by the updates stream."""
        return f"{self.prefix}.updates.{runner_id}"

    def logs(self, runner_id: str = "*", job_id: str = "*") -> str:
        """Log lines of ``job_id`` sent by ``runner_id``, captured by the logs stream."""
        return f"{self.prefix}.logs.{runner_id}.{job_id}"

    @property
    def config_change(self) -> str:
        """Config changes of an open installation, captured by the commands stream."""
        return f"{self.prefix}.config.change"

    def config_change_as(self, identity: str | None) -> str:
        """Config changes by ``identity`` (``*``: everyone's); ``None`` is :attr:`config_change`."""
        return self.config_change if identity is None else f"{self.config_change}.{identity}"

    def config_changes(self) -> tuple[str, str]:
        """What the config handler takes: the legacy subject and every identity's."""
        return (self.config_change, self.config_change_as("*"))

    def health(self, component: str = "*") -> str:
        """Worker health reports (core NATS)."""
        return f"{self.prefix}.health.{component}"

    def event(self, entity: str, subject_id: str, event_type: str) -> str:
        """An event about ``entity`` (job, runner, intake, config, health) ``subject_id``.

        Audit events (entity ``audit``) have a stream of their own: ``<prefix>.audit.…``.
        """
        if entity == "audit":
            return self.audit(subject_id, event_type)
        return f"{self.prefix}.events.{entity}.{subject_id}.{event_type}"

    def audit(self, subject_id: str = "*", event_type: str = "*") -> str:
        """An audit event (``>`` as ``subject_id``: every one), captured by the audit stream."""
        if subject_id == ">":
            return f"{self.prefix}.audit.>"
        return f"{self.prefix}.audit.{subject_id}.{event_type}"

    def events(self, pattern: str = ">") -> str:
        """A filter on the event stream: ``pattern`` is relative to ``<prefix>.events.``."""
        return f"{self.prefix}.events.{pattern}"

    def dead(self, handler: str = "*") -> str:
        """Dead letters of ``handler``."""
        return f"{self.prefix}.dead.{handler}"

    # -- service discovery (NATS micro: `$SRV`, outside the prefix by the NATS convention) --------
    @property
    def service_name(self) -> str:
        """The micro service name every process of this installation answers as."""
        return self.prefix

    def srv_subject(self, verb: str, instance: str | None = None) -> str:
        """``$SRV.<VERB>.<service_name>[.<instance>]``: ask this installation's processes."""
        tail = f".{instance}" if instance else ""
        return f"$SRV.{verb}.{self.service_name}{tail}"

    def srv_subjects(self) -> list[str]:
        """Every subject a process answers discovery on (what its NATS user must subscribe to).

        ``$SRV.<VERB>`` (every service on the server), ``$SRV.<VERB>.<name>`` and
        ``$SRV.<VERB>.<name>.<id>`` for the verbs PING, INFO and STATS; the answers go to the
        asker's reply inbox.
        """
        return [
            f"$SRV.{verb}{tail}"
            for verb in ("PING", "INFO", "STATS")
            for tail in ("", f".{self.service_name}", f".{self.service_name}.*")
        ]

    def as_sender(self, subject: str, identity: str | None) -> str:
        """``subject`` as ``identity`` sends it: a submission, cancel or config change is re-addressed.

        Any other subject is returned unchanged.
        """
        for base in (self.submit, self.cancel, self.config_change):
            if subject == base or self.sender(subject, base) is not None:
                return f"{base}.{identity}" if identity is not None else base
        return subject

    @staticmethod
    def sender(subject: str, base: str) -> str | None:
        """The identity (or runner id) ``subject`` carries after ``base``.

        ``None`` for ``base`` itself (a legacy subject without one).
        """
        if subject.startswith(base + "."):
            return subject[len(base) + 1 :]
        return None

    # -- streams and buckets ----------------------------------------------------------------------
    def stream(self, name: str) -> str:
        """A stream name (``submit``, ``commands``, ``updates``, ``events``, ``logs``, …).

        The others: ``dead`` and ``audit``.
        """
        return f"{self.prefix.upper()}_{name.upper()}".replace("-", "_")

    def bucket(self, name: str) -> str:
        """A KV bucket name: one of ``valkyrie.bus.BUCKETS`` (``jobs``, ``secrets`` …)."""
        """A KV bucket name (``jobs``, ``runners``, ``idempotency``, ``config``, ``stats``, …).

        The other: ``secrets``.
        """
        return f"{self.prefix}_{name}".replace("-", "_")
