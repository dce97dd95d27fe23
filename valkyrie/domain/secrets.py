"""Secret environment values (``JobSubmission.secret_env``) as pure rules.

A job's secret values exist in three places only: the submission while it waits in the submit
stream, the secrets bucket until the job ends, and the ``Dispatch`` of each attempt. Every other
copy (the job record, events, explain, dead letters, HTTP and CLI views) is built from the
redacted spec, whose ``secret_env`` maps each name to ``"***"``.
"""

from __future__ import annotations

from typing import Any

import msgspec

from schemas import REDACTED, FieldError, JobSubmission

__all__ = ["redact_body", "redact_spec", "secret_env_errors"]

_KEY = b"secret_env"
_decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()


def redact_spec(spec: JobSubmission) -> JobSubmission:
    """``spec`` with every secret value replaced by ``"***"`` (the names are kept)."""
    if not spec.secret_env:
        return spec
    return msgspec.structs.replace(spec, secret_env=dict.fromkeys(spec.secret_env, REDACTED))


def secret_env_errors(spec: JobSubmission) -> list[FieldError]:
    """Rules on ``secret_env`` the types cannot express."""
    errors: list[FieldError] = []
    for name, value in spec.secret_env.items():
        path = f"$.secret_env.{name}"
        if name.upper().startswith("VALKYRIE_"):
            errors.append(
                FieldError(path=path, reason="VALKYRIE_* names are reserved for the runner")
            )
        if "\0" in value:
            errors.append(FieldError(path=path, reason="an environment value cannot hold NUL"))
        if value == REDACTED:
            errors.append(
                FieldError(
                    path=path,
                    reason=f"{REDACTED!r} is what a stored copy shows instead of the value (a "
                    "replayed dead letter keeps no secret values): submit the job with the value",
                )
            )
    return errors


def redact_body(data: bytes) -> tuple[bytes, str | None]:
    """A submission body fit to be stored as a dead letter, and what was done to it.

    The values of a top-level ``secret_env`` become ``"***"`` (the body is re-encoded, so no
    duplicate key keeps a value); a body that names ``secret_env`` but cannot be read as a JSON
    object is dropped whole. ``None``: the body is returned unchanged.
    """
    if _KEY not in data:
        return data, None
    try:
        obj = _decoder.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError):
        obj = None
    if not isinstance(obj, dict):
        return b"", "payload dropped: it may hold secret values and could not be redacted"
    if "secret_env" not in obj:
        return data, None  # the word is elsewhere (a payload string): not the field
    secrets = obj["secret_env"]
    obj["secret_env"] = dict.fromkeys(secrets, REDACTED) if isinstance(secrets, dict) else REDACTED
    return _encoder.encode(obj), "secret_env values redacted from the payload"
