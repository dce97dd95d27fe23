"""How a handler's result (or failure) and a stop request become an attempt's outcome."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import msgspec

from schemas import JobResult
from valkyrie.runner._context import JobContext

__all__ = ["Outcome", "OutcomeName", "decide_outcome"]

OutcomeName = Literal["succeeded", "failed", "timed_out", "cancelled", "error"]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What ``JobFinished`` reports."""

    outcome: OutcomeName
    result: JobResult


def _from_result(result: JobResult) -> OutcomeName:
    if result.exit_code is None:
        return "error" if result.error else "succeeded"
    return "succeeded" if result.exit_code == 0 else "failed"


def decide_outcome(
    ctx: JobContext, result: JobResult | None, error: str | None, elapsed_ms: int
) -> Outcome:
    """Combine the handler's ``result`` (``None`` if it failed: ``error`` says why) and the stop.

    A stop request decides the outcome whatever the handler returned.

    Blank fields are filled in: the duration measured around the handler, the context's output
    tail, and the stop request's explanation as ``error``.
    """
    base = result or JobResult()
    outcome: OutcomeName
    match ctx.stop_reason:
        case "cancel" | "abandon":
            outcome = "cancelled"
        case "timeout":
            outcome = "timed_out"
        case "shutdown":
            outcome = "error"
        case None:
            outcome = "error" if result is None else _from_result(base)
    explanation = error if ctx.stop_reason is None else (ctx.stop_detail or error)
    return Outcome(
        outcome=outcome,
        result=msgspec.structs.replace(
            base,
            duration_ms=base.duration_ms or max(0, elapsed_ms),
            output_tail=base.output_tail or ctx.output_tail,
            error=base.error or explanation,
        ),
    )
