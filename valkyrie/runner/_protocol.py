"""The runner's side of the wire: registering, publishing job updates idempotently."""

from __future__ import annotations

import logging

import anyio
import msgspec
import nats.errors
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential,
    wait_exponential_jitter,
)

from schemas import JobUpdate, RegistrationVerdict, RunnerCommand, RunnerRegistration, SafeDecoder
from valkyrie.bus.codec import encode
from valkyrie.runner._errors import RegistrationRejected

__all__ = ["COMMAND_DECODER", "decode_verdict", "deregister", "publish_update", "register"]

log = logging.getLogger("valkyrie.runner")

COMMAND_DECODER = SafeDecoder(RunnerCommand)
_VERDICT_DECODER = SafeDecoder(RegistrationVerdict)


#: how long a runner leaving cleanly keeps asking to be forgotten
DEREGISTER_WITHIN_S = 5.0


async def deregister(
    nc: NatsClient,
    subject: str,
    runner_id: str,
    session_id: str | None,
    *,
    request_timeout_s: float,
    within_s: float = DEREGISTER_WITHIN_S,
) -> bool:
    """Ask the registry to forget this runner, so a clean exit is not reported lost (best effort).

    The registry refuses while the runner still has jobs whose results are on their way and says
    when to ask again (``retry_after_ms``); this does, for up to ``within_s``. ``True`` once
    forgotten.
    """
    body = encode({"runner_id": runner_id, "session_id": session_id})
    with anyio.move_on_after(within_s):
        while True:
            try:
                reply = await nc.request(subject, body, timeout=request_timeout_s)
                verdict = decode_verdict(reply.data)
            except nats.errors.NoRespondersError:
                log.info("runner %s: no registry to deregister with", runner_id)
                return False
            except (nats.errors.Error, OSError, msgspec.DecodeError) as e:
                log.debug("runner %s: deregistration not confirmed: %r", runner_id, e)
                await anyio.sleep(0.1)
                continue
            if verdict.accepted:
                return True
            if verdict.retry_after_ms is None:
                reasons = "; ".join(e.reason for e in verdict.errors)
                log.info("runner %s: deregistration refused: %s", runner_id, reasons)
                return False
            await anyio.sleep(verdict.retry_after_ms / 1000)  # heartbeats go on meanwhile
    log.info("runner %s: deregistration not confirmed; it will be reported lost", runner_id)
    return False


def decode_verdict(data: bytes) -> RegistrationVerdict:
    """Decode a registry answer (raises ``msgspec.DecodeError`` when it is not one)."""
    return _VERDICT_DECODER.decode(data)


class _NotYet(Exception):
    """A registration attempt that should be retried."""


async def _register_once(
    nc: NatsClient, subject: str, registration: RunnerRegistration, body: bytes, timeout_s: float
) -> RegistrationVerdict:
    try:
        msg = await nc.request(subject, body, timeout=timeout_s)
    except nats.errors.NoRespondersError as e:
        raise _NotYet(f"no registry listens on {subject}") from e
    except nats.errors.TimeoutError as e:
        raise _NotYet(f"no answer on {subject} within {timeout_s:g}s") from e
    except (nats.errors.Error, OSError) as e:
        raise _NotYet(f"request failed: {e!r}") from e
    try:
        verdict = _VERDICT_DECODER.decode(msg.data)
    except msgspec.DecodeError as e:
        raise _NotYet(f"unreadable registration verdict: {e}") from e
    if verdict.accepted:
        return verdict
    if verdict.errors:
        raise RegistrationRejected(registration.runner_id, list(verdict.errors))
    raise _NotYet("registration not accepted (no reason given)")


async def register(
    nc: NatsClient,
    subject: str,
    registration: RunnerRegistration,
    *,
    stopping: anyio.Event,
    request_timeout_s: float,
    max_backoff_s: float = 5.0,
) -> RegistrationVerdict | None:
    """Request registration until accepted; ``None`` when ``stopping`` was set first.

    Raises:
        RegistrationRejected: the registry answered with errors (retrying would not help).
    """
    body = encode(registration)

    async def interruptible_sleep(seconds: float) -> None:
        with anyio.move_on_after(seconds):
            await stopping.wait()

    def report(state: RetryCallState) -> None:
        # One line at first, then every tenth attempt: a runner started before the control plane
        # waits quietly instead of flooding its log.
        if state.attempt_number == 1 or state.attempt_number % 10 == 0:
            outcome = state.outcome
            cause = outcome.exception() if outcome is not None else None
            log.warning(
                "runner %s not registered yet (attempt %d: %s); retrying",
                registration.runner_id,
                state.attempt_number,
                cause,
            )

    try:
        async for attempt in AsyncRetrying(
            stop=lambda _state: stopping.is_set(),
            wait=wait_exponential_jitter(multiplier=0.1, max=max_backoff_s),
            retry=retry_if_exception_type(_NotYet),
            sleep=interruptible_sleep,
            before_sleep=report,
            reraise=True,
        ):
            with attempt:
                return await _register_once(nc, subject, registration, body, request_timeout_s)
    except _NotYet:
        return None
    return None  # pragma: no cover - AsyncRetrying either returns or raises


async def publish_update(
    js: JetStreamContext,
    subject: str,
    update: JobUpdate,
    msg_id: str,
    *,
    timeout_s: float = 5.0,
    retry_s: float = 60.0,
) -> bool:
    """Store ``update`` in the updates stream, retrying under the same ``Nats-Msg-Id``.

    The stream drops a retry of an already stored update as a duplicate, so retrying is safe.
    Returns whether the stream acknowledged it within ``retry_s``.
    """
    body = encode(update)
    try:
        async for attempt in AsyncRetrying(
            stop=stop_after_delay(retry_s),
            wait=wait_exponential(multiplier=0.05, max=2.0),
            retry=retry_if_exception_type((nats.errors.Error, OSError)),
            reraise=True,
        ):
            with attempt:
                await js.publish(subject, body, timeout=timeout_s, headers={"Nats-Msg-Id": msg_id})
    except (nats.errors.Error, OSError) as e:
        log.error("could not store update %s on %s within %gs: %r", msg_id, subject, retry_s, e)
        return False
    return True
