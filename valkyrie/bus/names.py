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
        """Job submissions (v2 or v1 body), captured by the submit stream."""
        return f"{self.prefix}.jobs.submit"

    @property
    def cancel(self) -> str:
        """Cancel requests, captured by the commands stream."""
        return f"{self.prefix}.jobs.cancel"

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
        """Request/reply: runner registration."""
        return f"{self.prefix}.runners.register"

    def heartbeat(self, runner_id: str = "*") -> str:
        """Runner heartbeats (core NATS)."""
        return f"{self.prefix}.runners.heartbeat.{runner_id}"

    def runner_admin(self, action: str = "*") -> str:
        """Request/reply: drain/undrain a runner."""
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

    def logs(self, job_id: str = "*") -> str:
        """Job log lines, captured by the logs stream."""
        return f"{self.prefix}.logs.{job_id}"

    @property
    def config_change(self) -> str:
        """Config changes, captured by the commands stream."""
        return f"{self.prefix}.config.change"

    def health(self, component: str = "*") -> str:
        """Worker health reports (core NATS)."""
        return f"{self.prefix}.health.{component}"

    def event(self, entity: str, subject_id: str, event_type: str) -> str:
        """An event about ``entity`` (job, runner, intake, config, health) ``subject_id``."""
        return f"{self.prefix}.events.{entity}.{subject_id}.{event_type}"

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

    # -- streams and buckets ----------------------------------------------------------------------
    def stream(self, name: str) -> str:
        """A stream name: ``submit``, ``commands``, ``updates``, ``events``, ``logs``, ``dead``."""
        return f"{self.prefix.upper()}_{name.upper()}".replace("-", "_")

    def bucket(self, name: str) -> str:
        """A KV bucket name: one of ``valkyrie.bus.BUCKETS`` (``jobs``, ``secrets`` …)."""
        return f"{self.prefix}_{name}".replace("-", "_")
