"""Small HTML builders for the console's fragments: every value escaped, no inline script or style.

The console's pages are server-rendered fragments; their markup carries ``data-*`` attributes
the console's script (and the browser tests) look for, never behaviour of its own.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from html import escape
from urllib.parse import urlencode

__all__ = [
    "Html",
    "age",
    "attrs",
    "badge",
    "button",
    "esc",
    "filters_form",
    "link",
    "section",
    "short",
    "table",
    "when",
]


class Html(str):
    """Markup that is already safe (built here, or escaped)."""

    __slots__ = ()


def esc(value: object) -> Html:
    """``value`` as text (escaped), or unchanged when it is :class:`Html` already."""
    if isinstance(value, Html):
        return value
    return Html(escape("" if value is None else str(value), quote=True))


def attrs(values: Mapping[str, object | None]) -> str:
    """`` name="value"`` pairs (``None`` values left out; ``True`` as a bare attribute)."""
    out = []
    for name, value in values.items():
        if value is None or value is False:
            continue
        out.append(f" {name}" if value is True else f' {name}="{esc(value)}"')
    return "".join(out)


def link(href: str, text: object, query: Mapping[str, object | None] | None = None) -> Html:
    """An in-console link (the console's script loads it without reloading the page)."""
    if query:
        kept = {k: v for k, v in query.items() if v not in (None, "")}
        if kept:
            href = f"{href}?{urlencode(kept)}"
    return Html(f'<a href="{esc(href)}" data-nav>{esc(text)}</a>')


def short(ident: str, keep: int = 12) -> str:
    """A long id cut for a table cell (the link and the row's data keep it whole)."""
    return ident if len(ident) <= keep + 1 else ident[:keep] + "…"


def badge(state: str, **data: object) -> Html:
    """A state shown as a coloured label (class ``s-<state>``)."""
    extra = attrs({f"data-{k.replace('_', '-')}": v for k, v in data.items()})
    return Html(f'<span class="badge s-{esc(state)}"{extra}>{esc(state)}</span>')


def button(text: str, action: str, **data: object) -> Html:
    """An action button: the console's script does ``action`` with ``data``, after asking."""
    extra = attrs({f"data-{k.replace('_', '-')}": v for k, v in data.items()})
    return Html(f'<button type="button" data-action="{esc(action)}"{extra}>{esc(text)}</button>')


def table(
    headers: Sequence[str],
    rows: Iterable[Sequence[object]],
    *,
    empty: str = "nothing to show",
    id_: str | None = None,
    row_data: Sequence[Mapping[str, object]] | None = None,
) -> Html:
    """A table; ``row_data[i]`` becomes ``data-*`` attributes of row ``i``."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        extra = ""
        if row_data is not None and i < len(row_data):
            extra = attrs({f"data-{k.replace('_', '-')}": v for k, v in row_data[i].items()})
        cells = "".join(f"<td>{esc(cell)}</td>" for cell in row)
        body.append(f"<tr{extra}>{cells}</tr>")
    if not body:
        body.append(f'<tr><td colspan="{len(headers)}" class="empty">{esc(empty)}</td></tr>')
    ident = attrs({"id": id_})
    return Html(
        f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    )


def filters_form(action: str, fields: Sequence[tuple[str, str, str | None]]) -> Html:
    """A GET form of text inputs (name, label, value) that reloads the page with its filters."""
    inputs = "".join(
        f'<label>{esc(label)} <input name="{esc(name)}"{attrs({"value": value})}></label>'
        for name, label, value in fields
    )
    return Html(
        f'<form class="filters" method="get" action="{esc(action)}" data-nav>{inputs}'
        '<button type="submit">Filter</button></form>'
    )


def section(title: str, *parts: object, id_: str | None = None) -> Html:
    """A titled section of a page."""
    inner = "".join(esc(p) for p in parts)
    return Html(f"<section{attrs({'id': id_})}><h2>{esc(title)}</h2>{inner}</section>")


def when(at_ms: int | None) -> str:
    """An instant in UTC, to the millisecond (the console's script shows it in local time)."""
    if at_ms is None:
        return "-"
    return dt.datetime.fromtimestamp(at_ms / 1000, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def age(ms: int | float | None) -> str:
    """A duration for people: ``850 ms``, ``12.3 s``, ``4 min 05 s``, ``2 h 03 min``."""
    if ms is None:
        return "-"
    ms = max(0.0, float(ms))
    if ms < 1000:
        return f"{ms:.0f} ms"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"
