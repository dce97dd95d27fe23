"""``python -m schemas``: regenerate ``schemas/json/`` and the event table of docs/subjects.md."""

from __future__ import annotations

import json
import pathlib

from schemas._catalog import json_schemas
from schemas._eventdoc import render_doc

#: the page listing every event (present in a source checkout, not in an installed package)
SUBJECTS_DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "subjects.md"


def main() -> None:
    """Write every schema file, remove ones no longer in the catalog, update the event table."""
    out = pathlib.Path(__file__).parent / "json"
    out.mkdir(exist_ok=True)
    wanted = json_schemas()
    for stale in out.glob("*.schema.json"):
        if stale.name not in wanted:
            stale.unlink()
    for name, schema in wanted.items():
        (out / name).write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
    print(f"wrote {len(wanted)} schemas to {out}")
    if SUBJECTS_DOC.exists():
        SUBJECTS_DOC.write_text(render_doc(SUBJECTS_DOC.read_text()))
        print(f"updated the event table of {SUBJECTS_DOC}")


if __name__ == "__main__":
    main()
