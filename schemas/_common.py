"""Shared field types and constraints of the wire contract.

Time: every instant on the wire is an integer count of milliseconds since the Unix epoch (UTC), in a
field whose name ends in ``_at_ms``. Every duration carries its unit in its name (``_ms`` or ``_s``).
"""

from __future__ import annotations

from typing import Annotated

import msgspec

__all__ = [
    "Identifier",
    "Label",
    "NonNegativeFloat",
    "NonNegativeInt",
    "Priority",
    "Ratio",
    "TimestampMs",
]

#: Ids double as NATS subject tokens and KV keys, so they are restricted to the characters both accept.
Identifier = Annotated[
    str,
    msgspec.Meta(
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_\-]*$",
        description="1-128 characters: letters, digits, '_' and '-' (it is used as a subject token)",
    ),
]
Label = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
Priority = Annotated[
    int, msgspec.Meta(ge=0, le=4, description="0 critical, 1 high, 2 normal, 3 low, 4 background")
]
NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]
NonNegativeFloat = Annotated[float, msgspec.Meta(ge=0)]
Ratio = Annotated[float, msgspec.Meta(ge=0, le=1)]
TimestampMs = Annotated[
    int, msgspec.Meta(ge=0, description="milliseconds since the Unix epoch, UTC")
]
