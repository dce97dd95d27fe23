"""Who sent a message, as the subject proves it: identity names, inboxes, reply and body checks.

With NATS auth on, each identity may publish only subjects that carry its own name (a runner its
own id), so the subject is the proof; a body field naming someone is only a claim. These rules
decide what a handler believes: the requester is the subject's identity, a ``Valkyrie-Reply-To``
is honoured only inside that identity's inbox, a body naming another runner than its subject is
refused. Open installations (no auth, legacy subjects without an identity) keep the body's word.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from schemas import JobRecord

__all__ = [
    "GATEWAY",
    "IDENTITY",
    "OPEN_INBOX",
    "RUNNER_PREFIX",
    "SUBMITTER_PREFIX",
    "attempt_runners",
    "inbox_prefix",
    "log_refusal",
    "reply_allowed",
    "requester",
    "runner_identity",
    "runner_mismatch",
    "speaks_for",
    "submitter_identity",
    "valid_identity",
]

#: identities are subject tokens (and inbox prefixes): letters, digits, ``_`` and ``-``
IDENTITY = re.compile(r"[A-Za-z0-9_\-]{1,128}")
#: the inbox every connection without an identity uses (nats-py's default)
OPEN_INBOX = "_INBOX"
#: the identity of the HTTP gateway, which may name the HTTP caller it acts for
GATEWAY = "gateway"
RUNNER_PREFIX = "runner-"
SUBMITTER_PREFIX = "submitter-"


def valid_identity(name: str) -> bool:
    """Whether ``name`` can be an identity (one subject token)."""
    return IDENTITY.fullmatch(name) is not None


def runner_identity(runner_id: str) -> str:
    """The identity of runner ``runner_id``."""
    return f"{RUNNER_PREFIX}{runner_id}"


def submitter_identity(name: str) -> str:
    """The identity of submitter ``name``."""
    return f"{SUBMITTER_PREFIX}{name}"


def inbox_prefix(identity: str | None) -> str:
    """The inbox prefix of ``identity``'s connections: ``_INBOX_<identity>`` (``_INBOX`` if none).

    Each identity may subscribe only below its own prefix, so nobody reads another's replies.
    """
    return OPEN_INBOX if identity is None else f"{OPEN_INBOX}_{identity}"


def reply_allowed(reply_to: str, identity: str | None) -> bool:
    """Whether a verdict may go to ``reply_to`` for a message sent by ``identity``.

    Only inside the sender's own inbox: a handler must not become a way to publish on subjects
    the sender may not publish itself. ``None`` (an open installation's legacy subject) allows
    the shared ``_INBOX.`` only.
    """
    return reply_to.startswith(inbox_prefix(identity) + ".") and " " not in reply_to


def requester(identity: str | None, claimed: str | None) -> str | None:
    """Who asked, for the record: the subject's identity, which a body may only refine.

    A sender may name itself more precisely (``admin:alice`` for ``admin``, ``monitor:fallback``
    for ``monitor``); the gateway (identity ``gateway``) names the HTTP caller whose token it
    checked (``http:<token name>``). Any other claim is replaced by the identity. Without an
    identity (an open installation's legacy subject) the claim is all there is.
    """
    if identity is None:
        return claimed
    if claimed is not None:
        if identity == GATEWAY and claimed.startswith("http:"):
            return claimed
        if speaks_for(identity, claimed):
            return claimed
    return identity


def speaks_for(identity: str, name: str | None) -> bool:
    """Whether ``name`` (a recorded requester) is ``identity`` or one of its refinements."""
    return name is not None and (name == identity or name.startswith(f"{identity}:"))


def runner_mismatch(subject_runner: str | None, body_runner: str) -> str | None:
    """Why a runner message is refused when its body names another runner than its subject.

    ``None`` when they agree, or when the subject carries no runner id (legacy, open only).
    """
    if subject_runner is None or subject_runner == body_runner:
        return None
    return (
        f"the subject is runner {subject_runner!r}'s but the body names runner {body_runner!r}: "
        "a runner may speak only for itself"
    )


def attempt_runners(record: JobRecord) -> dict[int, str]:
    """Which runner each attempt of the job was given to (attempt -> runner id)."""
    runners = {a.attempt: a.runner_id for a in record.attempts}
    if record.runner_id is not None and record.attempt:
        runners.setdefault(record.attempt, record.runner_id)
    return runners


def log_refusal(
    subject_runner: str, body_runner: str, attempt: int, runners: Mapping[int, str]
) -> str | None:
    """Why log lines are not shown as the job's: a runner the attempt was not given to sent them.

    Any runner may publish lines under its own id for any job id: the job's record says whose
    they are.
    """
    mismatch = runner_mismatch(subject_runner, body_runner)
    if mismatch is not None:
        return mismatch
    if runners.get(attempt) != subject_runner:
        return f"attempt {attempt} was not given to runner {subject_runner!r}"
    return None
