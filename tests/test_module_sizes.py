"""The size limits of issue 13 as a contract: modules stay small enough to read in one sitting.

Every ``.py`` under ``valkyrie/``, ``schemas/``, ``handlers/`` and ``tests/`` has at most
:data:`MODULE_LIMIT` lines; a handler at most :data:`HANDLER_LIMIT` (decode -> domain call ->
persist -> publish: what is not wiring belongs in ``valkyrie/domain`` or ``valkyrie/runtime``).
``benchmarks/`` is outside the contract. See docs/architecture.md, "The map".
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests._helpers import ROOT

MODULE_LIMIT = 500
HANDLER_LIMIT = 350
PACKAGES = ("valkyrie", "schemas", "handlers", "tests")


def _lines(path: Path) -> int:
    with path.open("rb") as f:
        return sum(1 for _ in f)


def oversize(root: Path) -> list[str]:
    """Every module under ``root`` over its limit, as ``path: lines > limit``."""
    found = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            limit = HANDLER_LIMIT if package == "handlers" else MODULE_LIMIT
            lines = _lines(path)
            if lines > limit:
                found.append(f"{path.relative_to(root)}: {lines} > {limit}")
    return found


def test_no_module_is_over_its_limit() -> None:
    found = oversize(ROOT)
    assert not found, "split these modules (issue 13's size limits):\n" + "\n".join(found)


@pytest.mark.parametrize(
    ("package", "lines", "caught"),
    [
        ("valkyrie", MODULE_LIMIT, False),
        ("valkyrie", MODULE_LIMIT + 1, True),
        ("tests", MODULE_LIMIT + 1, True),
        ("handlers", HANDLER_LIMIT, False),
        ("handlers", HANDLER_LIMIT + 1, True),
    ],
)
def test_the_check_catches_a_module_one_line_over(
    tmp_path: Path, package: str, lines: int, caught: bool
) -> None:
    module = tmp_path / package / "sub" / "big.py"
    module.parent.mkdir(parents=True)
    module.write_text("x = 1\n" * lines)
    assert bool(oversize(tmp_path)) is caught
