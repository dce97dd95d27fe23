"""Secret values as pure rules: redacted copies, dead-letter bodies, the runner's redactor."""

from __future__ import annotations

import json

import msgspec
import pytest

from schemas import REDACTED, Dispatch, JobResult, JobSubmission
from valkyrie.domain.intake import parse_submission, queued_record
from valkyrie.domain.secrets import redact_body, redact_spec, secret_env_errors
from valkyrie.errors import SchemaError
from valkyrie.runner._context import JobContext
from valkyrie.runner._redact import Redactor

SECRET = "hunter2-very-secret"


def spec(**secret_env: str) -> JobSubmission:
    return JobSubmission(job_type="build", secret_env=secret_env)


def test_the_record_keeps_names_never_values() -> None:
    body = json.dumps({"job_type": "build", "secret_env": {"TOKEN": SECRET, "B": "b" * 10}})
    parsed = parse_submission(body.encode(), received_at_ms=1, max_bytes=1 << 20)
    assert parsed.spec.secret_env == {"TOKEN": SECRET, "B": "b" * 10}  # intake needs them
    record = queued_record("j1", parsed, now_ms=1, source_seq=1)
    assert record.spec.secret_env == {"TOKEN": REDACTED, "B": REDACTED}
    assert SECRET.encode() not in msgspec.json.encode(record)
    assert redact_spec(spec()) == spec()


@pytest.mark.parametrize(
    ("secret_env", "path", "reason"),
    [
        ({"1TOKEN": "x"}, "$.secret_env", "matching regex"),
        ({"A-B": "x"}, "$.secret_env", "matching regex"),
        ({f"N{i}": "x" for i in range(65)}, "$.secret_env", "length <= 64"),
        ({"BIG": "x" * (32 * 1024 + 1)}, "$.secret_env", "length <= 32768"),
        ({"VALKYRIE_JOB_ID": "x"}, "$.secret_env.VALKYRIE_JOB_ID", "reserved"),
        ({"NUL": "a\0b"}, "$.secret_env.NUL", "NUL"),
        ({"AGAIN": REDACTED}, "$.secret_env.AGAIN", "replayed dead letter"),
    ],
)
def test_secret_env_bounds(secret_env: dict[str, str], path: str, reason: str) -> None:
    body = json.dumps({"job_type": "build", "secret_env": secret_env}).encode()
    with pytest.raises(SchemaError) as caught:
        parse_submission(body, received_at_ms=1, max_bytes=1 << 20)
    assert any(e.path.startswith(path) and reason in e.reason for e in caught.value.errors), (
        caught.value.errors
    )
    # no error message repeats a value
    assert not any("x" * 100 in e.reason for e in caught.value.errors)


def test_valid_names_pass() -> None:
    assert secret_env_errors(spec(TOKEN="t", _X1="y", lower_case="z")) == []


def test_repr_never_shows_values() -> None:
    job = spec(TOKEN=SECRET)
    assert SECRET not in repr(job)
    assert "TOKEN" in repr(job)
    dispatch = Dispatch(
        job_id="j",
        attempt=1,
        runner_id="r",
        spec=redact_spec(job),
        dispatched_at_ms=1,
        accept_by_at_ms=2,
        secret_env={"TOKEN": SECRET},
    )
    assert SECRET not in repr(dispatch)
    assert dispatch.secret_env["TOKEN"] == SECRET


def test_dead_letter_bodies_lose_their_values() -> None:
    plain = b'{"job_type": "build", "priority": 9}'
    assert redact_body(plain) == (plain, None)
    body = (
        b'{"job_type": "build", "priority": 9, "secret_env": {"T": "'
        + SECRET.encode()
        + b'"}, "secret_env": {"U": "'
        + SECRET.encode()
        + b'"}}'
    )
    kept, note = redact_body(body)
    assert SECRET.encode() not in kept
    assert note == "secret_env values redacted from the payload"
    assert json.loads(kept)["secret_env"] == {"U": REDACTED}  # duplicate keys: re-encoded
    assert json.loads(kept)["priority"] == 9  # the rest is kept for a replay
    # the wrong type: still replaced
    kept, _ = redact_body(b'{"job_type": "b", "secret_env": ["' + SECRET.encode() + b'"]}')
    assert SECRET.encode() not in kept
    # unreadable, but names the field: dropped whole
    kept, note = redact_body(b'{"secret_env": {"T": "' + SECRET.encode() + b'"')
    assert kept == b""
    assert note is not None
    assert "dropped" in note
    # the word elsewhere is not the field
    other = b'{"job_type": "b", "payload": {"command": "echo secret_env"}}'
    assert redact_body(other) == (other, None)


def test_redactor_hides_values_lines_and_longest_first() -> None:
    redact = Redactor(["abcdef", "abcdefgh", "line-one\nline-two", "no", ""])
    assert redact("x abcdefgh y abcdef z") == f"x {REDACTED} y {REDACTED} z"
    assert redact("got line-two here") == f"got {REDACTED} here"
    assert redact("no way") == "no way"  # too short to look for
    assert not Redactor([])
    assert Redactor([]).__call__("abc") == "abc"
    assert redact("a.c") == "a.c"  # values are literal, not patterns
    assert Redactor(["a.c1"])("abc1 a.c1") == f"abc1 {REDACTED}"


async def test_job_context_redacts_what_it_reports() -> None:
    class Sink:
        def __init__(self) -> None:
            self.lines: list[str] = []

        def write(self, line: str, stream: str) -> None:
            self.lines.append(line)

        async def wait_for_room(self) -> None:
            pass

    dispatch = Dispatch(
        job_id="j",
        attempt=1,
        runner_id="r",
        spec=redact_spec(spec(TOKEN=SECRET)),
        dispatched_at_ms=1,
        accept_by_at_ms=2,
        secret_env={"TOKEN": SECRET},
    )
    sink = Sink()
    ctx = JobContext(dispatch, "r", sink)  # type: ignore[arg-type]
    assert ctx.secret_env == {"TOKEN": SECRET}
    assert ctx.spec.secret_env == {"TOKEN": REDACTED}
    # a value longer than a line is cut at: redacted before the cut
    await ctx.log(f"token={SECRET}\nnext {SECRET} " + "y" * 20_000 + SECRET)
    assert sink.lines[0] == f"token={REDACTED}"
    assert sink.lines[1].startswith(f"next {REDACTED} ")
    assert not any(SECRET[:6] in line for line in sink.lines)
    result = ctx.redact_result(JobResult(exit_code=1, output_tail=SECRET, error=f"bad {SECRET}"))
    assert result.output_tail == REDACTED
    assert result.error == f"bad {REDACTED}"
    assert SECRET not in ctx.output_tail
