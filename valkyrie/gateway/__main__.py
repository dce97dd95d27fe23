"""``python -m valkyrie.gateway --write-openapi docs/openapi.json`` (or ``--check``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from valkyrie.gateway._factory import build_app
from valkyrie.gateway._openapi import openapi_json


def main(argv: list[str] | None = None) -> int:
    """Write the OpenAPI document, or check that the checked-in one is current."""
    parser = argparse.ArgumentParser(prog="python -m valkyrie.gateway")
    parser.add_argument("--write-openapi", type=Path, metavar="FILE", help="write the document")
    parser.add_argument("--check", type=Path, metavar="FILE", help="exit 1 if FILE is stale")
    args = parser.parse_args(argv)
    document = openapi_json(build_app(None))
    if args.check is not None:
        current = args.check.read_text() if args.check.exists() else ""
        if current != document:
            print(
                f"{args.check} is stale: run `python -m valkyrie.gateway --write-openapi "
                f"{args.check}`",
                file=sys.stderr,
            )
            return 1
        return 0
    if args.write_openapi is not None:
        args.write_openapi.write_text(document)
        print(f"wrote {args.write_openapi}")
        return 0
    sys.stdout.write(document)
    return 0


if __name__ == "__main__":
    sys.exit(main())
