"""Reading request bodies: size limit (live), content type, and JSON decoding with msgspec.

Bodies are decoded here rather than by Litestar so that they meet exactly the validation the bus
applies (the ``schemas`` Structs and ``valkyrie.domain.intake``) and every problem is reported at once.
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request

from schemas import MAX_JSON_DEPTH, FieldError, SafeDecoder, depth_error, too_deep
from valkyrie.gateway._context import gateway_of
from valkyrie.gateway._problems import ProblemError

__all__ = ["json_body", "raw_body"]

_DECODER: SafeDecoder[Any] = SafeDecoder()


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


async def raw_body(request: Request[Any, Any, Any]) -> bytes:
    """The body, refused with 413 past ``http.max_body_bytes`` (read live).

    The declared length is checked first, then the bytes actually received, so neither a lying
    ``Content-Length`` nor a chunked upload gets past the limit.
    """
    limit = gateway_of(request).config.http.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(size, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: int, limit: int) -> ProblemError:
    return ProblemError(
        413, f"the body is {size}+ bytes; the limit is {limit} (http.max_body_bytes)"
    )


async def json_body(request: Request[Any, Any, Any], *, required: bool = True) -> tuple[bytes, Any]:
    """The raw body and its decoded JSON (``None`` for an empty optional body).

    Raises:
        ProblemError: 413 too large, 415 not JSON, 400 broken JSON, a missing body, or JSON
            nested deeper than ``MAX_JSON_DEPTH``.
    """
    body = await raw_body(request)
    if not body.strip():
        if required:
            raise ProblemError(400, "a JSON body is required", slug="missing-body")
        return body, None
    content_type = request.headers.get("content-type")
    # A missing Content-Type is read as JSON (the only body type any route takes); another is not.
    if content_type is not None and not _is_json(content_type):
        raise ProblemError(
            415,
            f"the body must be application/json, not {content_type!r}",
            headers={"Accept": "application/json"},
        )
    if too_deep(body):
        # refused before anything decodes or stores it: a deep document would break every
        # later read of it (see schemas/_depth.py)
        raise ProblemError(
            400,
            f"the body nests objects and arrays deeper than {MAX_JSON_DEPTH} levels",
            slug="too-deep",
            errors=[depth_error()],
        )
    try:
        return body, _DECODER.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError) as e:
        raise ProblemError(
            400,
            f"the body is not valid JSON: {e}",
            slug="invalid-json",
            errors=[FieldError(path="$", reason=f"invalid JSON: {e}")],
        ) from e
