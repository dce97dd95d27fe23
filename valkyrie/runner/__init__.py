"""The runner SDK: take jobs from a Valkyrie control plane and run them.

A runner registers, heartbeats, accepts dispatches up to its capacity, runs each job through a
:data:`JobHandler`, and reports the attempt's updates and logs. :class:`ShellHandler` is the
reference handler: it executes the payload's command. See ``docs/runners.md``.

A runner executes whatever it is sent: connect it only to a NATS server you control, and run it as
an unprivileged user.
"""

from valkyrie.runner._context import JobContext, JobHandler, StopReason
from valkyrie.runner._errors import JobError, RegistrationRejected
from valkyrie.runner._logs import LogStream
from valkyrie.runner._reference import (
    default_runner_id,
    local_resources,
    reference_registration,
    run_reference_runner,
)
from valkyrie.runner._runner import Runner
from valkyrie.runner._shell import CommandPayload, ShellHandler, parse_command_payload

__all__ = [
    "CommandPayload",
    "JobContext",
    "JobError",
    "JobHandler",
    "LogStream",
    "RegistrationRejected",
    "Runner",
    "ShellHandler",
    "StopReason",
    "default_runner_id",
    "local_resources",
    "parse_command_payload",
    "reference_registration",
    "run_reference_runner",
]
