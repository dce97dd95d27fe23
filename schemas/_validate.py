"""Structural validation that reports every problem at once, each with its JSON path.

msgspec stops at the first error; a publisher deserves the whole list, so each field is checked on
its own (recursing into nested Structs, list items and object members) before the whole object is
converted.
"""

from __future__ import annotations

import functools
import json
import re
import types
import typing
from typing import Any, TypeVar, Union, get_args, get_origin

import msgspec

from schemas.jobs import FieldError

__all__ = [
    "collect_errors",
    "convert_or_errors",
    "integral_floats",
    "json_type_name",
    "unknown_fields",
]

T = TypeVar("T", bound=msgspec.Struct)
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_AT = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<at>[^`]*)`)?$", re.S)


def json_type_name(value: object) -> str:
    """Name a decoded JSON value's type the way a JSON user would."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _strip_annotated(tp: Any) -> Any:
    while get_origin(tp) is typing.Annotated:
        tp = get_args(tp)[0]
    return tp


def _struct_in(tp: Any) -> type[msgspec.Struct] | None:
    """Return the Struct type in ``tp`` (bare or inside an Optional), if exactly one."""
    tp = _strip_annotated(tp)
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return tp
    if get_origin(tp) in (Union, types.UnionType):
        found = {s for s in map(_struct_in, get_args(tp)) if s is not None}
        if len(found) == 1:  # a union of several Structs (tagged) cannot be checked field-wise
            return found.pop()
    return None


def _container_arg(tp: Any, container: type) -> Any | None:
    """The item type of ``list[X]`` or value type of ``dict[K, X]`` in ``tp`` (maybe Optional)."""
    tp = _strip_annotated(tp)
    origin = get_origin(tp)
    if origin is container:
        return get_args(tp)[-1]
    if origin in (Union, types.UnionType):
        for arg in get_args(tp):
            found = _container_arg(arg, container)
            if found is not None:
                return found
    return None


def _error(path: str, exc: msgspec.ValidationError) -> FieldError:
    match = _AT.match(str(exc))
    assert match is not None  # the pattern matches any string
    return FieldError(path=path + (match.group("at") or ""), reason=match.group("msg"))


def _key_path(path: str, key: object) -> str:
    """The path of object member ``key`` under ``path``: ``$.a.b``, or ``$.a["b.c"]`` if needed."""
    if isinstance(key, str) and _NAME.match(key):
        return f"{path}.{key}"
    return f"{path}[{json.dumps(key)}]"


def _value_errors(tp: Any, value: Any, path: str) -> list[FieldError]:
    """Every problem of ``value`` against type ``tp``, descending into Structs, lists and dicts."""
    try:
        msgspec.convert(value, tp)
    except msgspec.ValidationError as exc:
        first = _error(path, exc)
    else:
        return []
    found: list[FieldError] = []
    struct = _struct_in(tp)
    item = _container_arg(tp, list)
    member = _container_arg(tp, dict)
    if struct is not None and isinstance(value, dict):
        found = collect_errors(struct, value, path)
    elif item is not None and isinstance(value, list):
        for index, entry in enumerate(value):
            found.extend(_value_errors(item, entry, f"{path}[{index}]"))
    elif member is not None and isinstance(value, dict):
        for key, entry in value.items():
            found.extend(_value_errors(member, entry, _key_path(path, key)))
    # a constraint on the container itself (e.g. its length) when every item is fine
    return found or [first]


def collect_errors(tp: type[msgspec.Struct], obj: Any, path: str = "$") -> list[FieldError]:
    """Check ``obj`` (decoded JSON) against Struct ``tp``; return every problem found.

    Paths are exact: ``$.requirements.cpu_cores``, ``$.routing_hints.affinity_rules[0].values``,
    ``$.metadata.team`` (``$.metadata["a.b"]`` for keys that are not plain names).
    """
    if not isinstance(obj, dict):
        return [FieldError(path=path, reason=f"Expected `object`, got `{json_type_name(obj)}`")]
    errors: list[FieldError] = []
    for field in msgspec.structs.fields(tp):
        field_path = f"{path}.{field.encode_name}"
        if field.encode_name not in obj:
            if field.required:
                errors.append(FieldError(path=field_path, reason="required field is missing"))
            continue
        errors.extend(_value_errors(field.type, obj[field.encode_name], field_path))
    return errors


def _wants_int(tp: Any) -> bool:
    tp = _strip_annotated(tp)
    if tp is int:
        return True
    if get_origin(tp) in (Union, types.UnionType):
        args = [_strip_annotated(a) for a in get_args(tp)]
        return int in args and float not in args
    return False


def integral_floats(tp: Any, value: Any) -> Any:
    """``value`` with each whole-number float that ``tp`` wants as an ``int`` made one.

    JSON Schema counts ``1.0`` as an integer, so a client checking a body against the published
    schemas may send it; msgspec refuses a float for an ``int``. Values typed ``Any`` (a job's
    payload) are left exactly as sent.
    """
    if isinstance(value, float):
        return int(value) if value.is_integer() and _wants_int(tp) else value
    struct = _struct_in(tp)
    if struct is not None and isinstance(value, dict):
        fields = {f.encode_name: f.type for f in msgspec.structs.fields(struct)}
        return {k: integral_floats(fields[k], v) if k in fields else v for k, v in value.items()}
    item = _container_arg(tp, list)
    if item is not None and isinstance(value, list):
        return [integral_floats(item, v) for v in value]
    member = _container_arg(tp, dict)
    if member is not None and isinstance(value, dict):
        return {k: integral_floats(member, v) for k, v in value.items()}
    return value


def convert_or_errors(tp: type[T], obj: Any) -> tuple[T | None, list[FieldError]]:
    """Convert decoded JSON to ``tp``, or return every error with its path.

    A whole-number float where an ``int`` is wanted is taken as that int (:func:`integral_floats`).
    """
    try:
        return msgspec.convert(obj, tp), []
    except msgspec.ValidationError as first:
        obj = integral_floats(tp, obj)
        try:
            return msgspec.convert(obj, tp), []
        except msgspec.ValidationError:
            return None, _value_errors(tp, obj, "$") or [_error("$", first)]


def unknown_fields(tp: type[msgspec.Struct], obj: Any, path: str = "$") -> list[str]:
    """Paths of keys in ``obj`` that ``tp`` (and its nested Structs) does not define.

    Wire messages accept unknown fields (old readers must skip new ones); this lets a receiver
    warn about them, which catches typos such as ``requirments``.
    """
    if not isinstance(obj, dict):
        return []
    fields = _shape(tp)
    found: list[str] = []
    for key, value in obj.items():
        if key not in fields:
            found.append(f"{path}.{key}")
            continue
        nested, item = fields[key]
        if nested is not None and isinstance(value, dict):
            found.extend(unknown_fields(nested, value, f"{path}.{key}"))
        if item is not None and isinstance(value, list):
            for index, entry in enumerate(value):
                found.extend(unknown_fields(item, entry, f"{path}.{key}[{index}]"))
    return found


@functools.cache
def _shape(
    tp: type[msgspec.Struct],
) -> dict[str, tuple[type[msgspec.Struct] | None, type[msgspec.Struct] | None]]:
    """Per field: the nested Struct, and the Struct of list items (resolving types is slow)."""
    out: dict[str, tuple[type[msgspec.Struct] | None, type[msgspec.Struct] | None]] = {}
    for f in msgspec.structs.fields(tp):
        item_type = _container_arg(f.type, list)
        out[f.encode_name] = (
            _struct_in(f.type),
            _struct_in(item_type) if item_type is not None else None,
        )
    return out
