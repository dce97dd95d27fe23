"""Lazy public names for a package ``__init__``: import a submodule only when a name is used.

Importing one floor of Valkyrie must not drag in the others: the runner SDK a runner host installs
imports ``valkyrie.bus.codec``, which runs ``valkyrie/__init__`` and ``valkyrie/bus/__init__``;
if those imported their public names eagerly, the host would load Prometheus, the embedded
nats-server manager and the whole control plane. So an ``__init__`` lists its public names once,
as imports inside ``if TYPE_CHECKING:`` (what type checkers and readers see), and
:func:`attach` reads that block back from the file to resolve each name on first use
(PEP 562 ``__getattr__``), the way scientific-python's ``lazy_loader`` reads stub files.
"""

from __future__ import annotations

import ast
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["attach", "lazy_names"]


def lazy_names(file: str) -> dict[str, str]:
    """Name -> module of every ``from M import name`` inside the file's ``if TYPE_CHECKING:``."""
    tree = ast.parse(Path(file).read_text(encoding="utf-8"))
    names: dict[str, str] = {}
    for node in tree.body:
        if not (
            isinstance(node, ast.If)
            and isinstance(node.test, ast.Name)
            and node.test.id == "TYPE_CHECKING"
        ):
            continue
        for stmt in node.body:
            if isinstance(stmt, ast.ImportFrom) and stmt.module and stmt.level == 0:
                for alias in stmt.names:
                    names[alias.asname or alias.name] = stmt.module
    return names


def attach(package: str, file: str) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package`` whose ``__init__`` is ``file``."""
    table: dict[str, str] | None = None
    module = importlib.import_module(package)

    def __getattr__(name: str) -> Any:
        nonlocal table
        if table is None:
            table = lazy_names(file)
        source = table.get(name)
        if source is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(source), name)
        setattr(module, name, value)  # later lookups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(module), *lazy_names(file)})

    return __getattr__, __dir__
