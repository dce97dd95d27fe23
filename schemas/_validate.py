"""Structural validation that reports every problem at once, each with its JSON path.

msgspec stops at the first error; a publisher deserves the whole list, so each field is checked on its
own (recursing into nested Structs) before the whole object is converted.
"""

from __future__ import annotations

import re
import types
import typing
from typing import Any, TypeVar, Union, get_args, get_origin

import msgspec

from schemas.jobs import FieldError

__all__ = ["collect_errors", "convert_or_errors", "json_type_name"]

T = TypeVar("T", bound=msgspec.Struct)
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
    """Return the Struct type in ``tp`` (bare or inside an Optional), if any."""
    tp = _strip_annotated(tp)
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return tp
    if get_origin(tp) in (Union, types.UnionType):
        for arg in get_args(tp):
            found = _struct_in(arg)
            if found is not None:
                return found
    return None


def _list_item_struct(tp: Any) -> type[msgspec.Struct] | None:
    tp = _strip_annotated(tp)
    if get_origin(tp) is list:
        (item,) = get_args(tp)
        return _struct_in(item)
    return None


def _error(path: str, exc: msgspec.ValidationError) -> FieldError:
    match = _AT.match(str(exc))
    assert match is not None  # the pattern matches any string
    return FieldError(path=path + (match.group("at") or ""), reason=match.group("msg"))


def collect_errors(tp: type[msgspec.Struct], obj: Any, path: str = "$") -> list[FieldError]:
    """Check ``obj`` (decoded JSON) against Struct ``tp``; return every problem found."""
    if not isinstance(obj, dict):
        return [FieldError(path=path, reason=f"Expected `object`, got `{json_type_name(obj)}`")]
    errors: list[FieldError] = []
    for field in msgspec.structs.fields(tp):
        field_path = f"{path}.{field.encode_name}"
        if field.encode_name not in obj:
            if field.required:
                errors.append(FieldError(path=field_path, reason="required field is missing"))
            continue
        value = obj[field.encode_name]
        nested = _struct_in(field.type)
        item = _list_item_struct(field.type)
        if nested is not None and isinstance(value, dict):
            errors.extend(collect_errors(nested, value, field_path))
        elif item is not None and isinstance(value, list):
            for index, entry in enumerate(value):
                errors.extend(collect_errors(item, entry, f"{field_path}[{index}]"))
        else:
            try:
                msgspec.convert(value, field.type)
            except msgspec.ValidationError as exc:
                errors.append(_error(field_path, exc))
    return errors


def convert_or_errors(tp: type[T], obj: Any) -> tuple[T | None, list[FieldError]]:
    """Convert decoded JSON to ``tp``, or return every error with its path."""
    try:
        return msgspec.convert(obj, tp), []
    except msgspec.ValidationError as first:
        errors = collect_errors(tp, obj)
        return None, errors or [_error("$", first)]
