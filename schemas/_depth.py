"""How deeply a JSON document may nest, measured on its bytes before anything decodes it.

Decoding and encoding JSON recurse once per level, so a small document nested a thousand levels
deep exhausts the interpreter's recursion limit wherever it is read: when it is received, and
again every time a stored copy is read or served. Every input is therefore refused at the door
when it nests deeper than :data:`MAX_JSON_DEPTH`, far below that limit.
"""

from __future__ import annotations

import itertools
import re
from typing import Any, Generic, TypeVar, overload

import msgspec

from schemas.jobs import FieldError

__all__ = ["MAX_JSON_DEPTH", "SafeDecoder", "depth_error", "too_deep"]

T = TypeVar("T")

#: the deepest nesting of objects and arrays a message or request body may have (``{}`` is 1)
MAX_JSON_DEPTH = 64

_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
_NOT_BRACKET = bytes(sorted(set(range(256)) - set(b"[]{}")))
#: an opening bracket becomes +1, a closing one -1 (as signed bytes)
_STEPS = bytes.maketrans(b"[]{}", b"\x01\xff\x01\xff")


def too_deep(data: bytes | bytearray | memoryview | str, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether the JSON text ``data`` nests objects and arrays deeper than ``limit`` levels.

    Linear in the size of ``data`` and never recursive: strings are removed (brackets inside
    them do not count), and the depth is the highest running count of open brackets.
    """
    raw = data.encode() if isinstance(data, str) else bytes(data)
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False  # the common case: not even that many containers
    steps = _STRING.sub(b"", raw).translate(None, _NOT_BRACKET).translate(_STEPS)
    return max(itertools.accumulate(memoryview(steps).cast("b")), default=0) > limit


def depth_error(limit: int = MAX_JSON_DEPTH) -> FieldError:
    """The problem reported for a document nested deeper than ``limit``."""
    return FieldError(
        path="$", reason=f"nested deeper than {limit} levels of objects and arrays (the limit)"
    )


class SafeDecoder(Generic[T]):
    """A msgspec JSON decoder (built once) for which too deep is just undecodable.

    A document nested too deeply for the interpreter's recursion limit raises
    :class:`msgspec.DecodeError`, like any other input that cannot be decoded, rather than
    :class:`RecursionError`, which no ``except msgspec.DecodeError`` catches.
    """

    __slots__ = ("_decoder",)

    @overload
    def __init__(self: SafeDecoder[Any]) -> None: ...
    @overload
    def __init__(self: SafeDecoder[T], type: type[T]) -> None: ...
    @overload
    def __init__(self: SafeDecoder[Any], type: Any) -> None: ...
    def __init__(self, type: Any = Any) -> None:
        self._decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder(type)

    def decode(self, data: bytes | bytearray | memoryview | str) -> T:
        """Decode ``data``.

        Raises:
            msgspec.DecodeError: not JSON, or nested too deep to decode.
            msgspec.ValidationError: JSON, but not of the decoder's type.
        """
        try:
            value: T = self._decoder.decode(data)
        except RecursionError as e:
            raise msgspec.DecodeError("JSON nested too deep to decode") from e
        return value
