"""The base of every typed event: one Struct per event ``type``, split into envelope and ``data``.

A typed event's fields are the envelope's identity (``subject_id``, and for job events ``attempt``
and ``correlation_id``) plus its ``data`` keys, each under its encoded name. Readers decode an
:class:`~schemas.events.Event` back with :meth:`TypedEvent.from_envelope` (or
:func:`schemas.event_catalog.typed_event`, which picks the Struct by ``type``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Self

import msgspec

from schemas.events import Event

__all__ = ["IDENTITY_FIELDS", "TypedEvent", "data_keys", "required_keys"]

#: the fields that go to the envelope instead of ``data``
IDENTITY_FIELDS = ("subject_id", "attempt", "correlation_id")


@dataclass(frozen=True, slots=True)
class _Layout:
    """How one typed event maps to the envelope (worked out once per class)."""

    data: tuple[tuple[str, str], ...]  # (attribute, data key), in field order
    identity: tuple[str, ...]  # the identity fields the class has, besides subject_id
    keys: frozenset[str]
    required: frozenset[str]
    optional: frozenset[str]


_LAYOUTS: dict[type[TypedEvent], _Layout] = {}


def _layout(cls: type[TypedEvent]) -> _Layout:
    layout = _LAYOUTS.get(cls)
    if layout is None:
        fields = msgspec.structs.fields(cls)
        data = tuple((f.name, f.encode_name) for f in fields if f.name not in IDENTITY_FIELDS)
        keys = frozenset(key for _, key in data)
        names = {f.name for f in fields}
        layout = _LAYOUTS[cls] = _Layout(
            data=data,
            identity=tuple(n for n in IDENTITY_FIELDS[1:] if n in names),
            keys=keys,
            required=keys - cls.optional_keys,
            optional=cls.optional_keys,
        )
    return layout


def data_keys(cls: type[TypedEvent]) -> frozenset[str]:
    """Every ``data`` key ``cls`` knows."""
    return _layout(cls).keys


def required_keys(cls: type[TypedEvent]) -> frozenset[str]:
    """The ``data`` keys every event of ``cls`` carries (the others only when set)."""
    return _layout(cls).required


class TypedEvent(msgspec.Struct, frozen=True, kw_only=True):
    """One kind of event on ``<prefix>.events.<entity>.<subject_id>.<kind>``.

    Subclasses that are a kind set ``event_type`` (``"<entity>.<kind>"``); ``kind`` is derived from
    it. ``optional_keys`` are ``data`` keys left out (not sent as ``null``) while ``None``. The
    event's id, which the stream de-duplicates on, is :meth:`event_id`.
    """

    entity: ClassVar[str]
    event_type: ClassVar[str]
    kind: ClassVar[str]
    #: what ``subject_id`` is, in words (for the catalogue's documentation)
    subject_doc: ClassVar[str]
    optional_keys: ClassVar[frozenset[str]] = frozenset()

    subject_id: str

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        declared = cls.__dict__.get("event_type")
        if declared is not None:
            entity, _, kind = str(declared).partition(".")
            if entity != cls.entity or not kind:
                raise TypeError(f"{cls.__name__}: event_type {declared!r} is not {cls.entity}.*")
            cls.kind = kind

    def event_id(self) -> str | None:
        """The id derived from what happened, so a redone step is dropped as a duplicate.

        ``None``: this kind has no natural id; the publisher gives it a random one.
        """
        return None

    def data(self) -> dict[str, Any]:
        """The envelope's ``data``: every non-identity field by its key (optional ones when set)."""
        layout = _layout(type(self))
        out: dict[str, Any] = {}
        for name, key in layout.data:
            value = getattr(self, name)
            if value is None and key in layout.optional:
                continue
            out[key] = value
        return out

    def envelope(self, *, event_id: str, at_ms: int, source: str) -> Event:
        """The :class:`~schemas.events.Event` this typed event travels in."""
        return Event(
            id=event_id,
            type=self.event_type,
            at_ms=at_ms,
            source=source,
            subject_id=self.subject_id,
            attempt=getattr(self, "attempt", None),
            correlation_id=getattr(self, "correlation_id", None),
            data=self.data(),
        )

    @classmethod
    def from_envelope(cls, envelope: Event, *, strict: bool = False) -> Self:
        """Decode ``envelope`` as this kind.

        Unknown ``data`` keys (from newer versions) are ignored unless ``strict``; ``strict`` also
        requires every key that is always sent, and no identity this kind does not have.

        Raises:
            msgspec.ValidationError: ``envelope`` is not a valid event of this kind.
        """
        layout = _layout(cls)
        if envelope.type != cls.event_type:
            raise msgspec.ValidationError(
                f"a {envelope.type!r} event is not a {cls.event_type!r} event"
            )
        fields: dict[str, Any] = dict(envelope.data)
        if strict:
            _check_strictly(cls, layout, envelope)
        fields["subject_id"] = envelope.subject_id
        for name in layout.identity:
            fields[name] = getattr(envelope, name)
        return msgspec.convert(fields, cls)


def _check_strictly(cls: type[TypedEvent], layout: _Layout, envelope: Event) -> None:
    problems = [f"unknown data key {k!r}" for k in sorted(set(envelope.data) - layout.keys)]
    problems += [f"missing data key {k!r}" for k in sorted(layout.required - set(envelope.data))]
    problems += [
        f"{name} is set, but a {cls.event_type!r} event has none"
        for name in IDENTITY_FIELDS[1:]
        if name not in layout.identity and getattr(envelope, name) is not None
    ]
    if problems:
        raise msgspec.ValidationError(f"{cls.__name__}: " + "; ".join(problems))
