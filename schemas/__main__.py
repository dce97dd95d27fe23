"""``python -m schemas``: regenerate ``schemas/json/`` from the Structs."""

from __future__ import annotations

import json
import pathlib

from schemas._catalog import json_schemas


def main() -> None:
    """Write every schema file and remove ones no longer in the catalog."""
    out = pathlib.Path(__file__).parent / "json"
    out.mkdir(exist_ok=True)
    wanted = json_schemas()
    for stale in out.glob("*.schema.json"):
        if stale.name not in wanted:
            stale.unlink()
    for name, schema in wanted.items():
        (out / name).write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
    print(f"wrote {len(wanted)} schemas to {out}")


if __name__ == "__main__":
    main()
