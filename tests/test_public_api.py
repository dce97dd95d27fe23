"""Every package declares its public names: sorted ``__all__``, nothing missing, py.typed shipped."""

from __future__ import annotations

import importlib
import subprocess
import sys
import tomllib
import types
from pathlib import Path

import pytest

from tests._helpers import ROOT

PACKAGES = [
    "valkyrie",
    "schemas",
    "handlers",
    "valkyrie.cli",
    "valkyrie.gateway",
    "valkyrie.runner",
    "valkyrie.bus",
    "valkyrie.client",
    "valkyrie.config",
    "valkyrie.domain",
    "valkyrie.domain.scheduling",
    "valkyrie.runtime",
    "valkyrie.security",
]
#: packages whose public names load on first use (valkyrie._lazy)
LAZY = [
    "valkyrie",
    "valkyrie.bus",
    "valkyrie.client",
    "valkyrie.config",
    "valkyrie.domain.scheduling",
    "valkyrie.runtime",
    "valkyrie.security",
]
TOP_LEVEL = ["valkyrie", "schemas", "handlers"]


def _ruf022_key(name: str) -> tuple[int, str]:
    """ruff's RUF022 "isort-style" order: SCREAMING_CASE, then CamelCase, then the rest."""
    return (0 if name.isupper() else 1 if name[0].isupper() else 2, name)


def _all(package: str) -> list[str]:
    module = importlib.import_module(package)
    names = getattr(module, "__all__", None)
    assert isinstance(names, list), f"{package} has no __all__ list"
    return names


def test_sort_key_matches_ruff() -> None:
    names = ["main", "Client", "BUCKETS", "connect", "ExitCode", "ENTRY_POINT_GROUP", "V2"]
    assert sorted(names, key=_ruf022_key) == [
        "BUCKETS",
        "ENTRY_POINT_GROUP",
        "V2",
        "Client",
        "ExitCode",
        "connect",
        "main",
    ]


@pytest.mark.parametrize("package", PACKAGES)
def test_all_is_sorted_and_unique(package: str) -> None:
    names = _all(package)
    assert len(set(names)) == len(names), f"{package}.__all__ has duplicates"
    assert names == sorted(names, key=_ruf022_key), (
        f"{package}.__all__ is not sorted (ruff RUF022): expected {sorted(names, key=_ruf022_key)}"
    )


@pytest.mark.parametrize("package", PACKAGES)
def test_all_names_exist(package: str) -> None:
    module = importlib.import_module(package)
    missing = [name for name in _all(package) if not hasattr(module, name)]
    assert not missing, f"{package}.__all__ names missing attributes: {missing}"


def _public_names(module: types.ModuleType) -> set[str]:
    """Names the package's ``__init__`` binds that do not start with ``_`` (modules excluded)."""
    return {
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and not isinstance(value, types.ModuleType)
        and type(value).__module__ != "__future__"  # `from __future__ import annotations`
        and name != "TYPE_CHECKING"  # the lazy packages' table of names sits under it
    }


@pytest.mark.parametrize("package", PACKAGES)
def test_every_public_name_is_in_all(package: str) -> None:
    module = importlib.import_module(package)
    undeclared = sorted(_public_names(module) - set(_all(package)))
    assert not undeclared, (
        f"{package} binds public names missing from __all__: {undeclared} "
        "(add them to __all__, or import them under a private alias)"
    )


@pytest.mark.parametrize("package", TOP_LEVEL)
def test_package_ships_py_typed(package: str) -> None:
    module = importlib.import_module(package)
    assert module.__file__ is not None
    assert (Path(module.__file__).parent / "py.typed").is_file(), f"{package}/py.typed is missing"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_data = pyproject["tool"]["setuptools"]["package-data"]
    assert "py.typed" in package_data.get(package, []), (
        f"pyproject.toml does not ship {package}/py.typed"
    )


@pytest.mark.parametrize("package", LAZY)
def test_lazy_names_are_the_public_api(package: str) -> None:
    """The ``if TYPE_CHECKING:`` imports are the lazy table; with the eager names, ``__all__``."""
    from valkyrie._lazy import lazy_names

    module = importlib.import_module(package)
    assert module.__file__ is not None
    lazy = set(lazy_names(module.__file__))
    eager = {n for n in _all(package) if n in vars(module)} - lazy
    assert lazy <= set(_all(package)), (
        f"lazy names missing from __all__: {lazy - set(_all(package))}"
    )
    assert lazy | eager == set(_all(package))


def test_the_runner_sdk_loads_no_control_plane() -> None:
    """A runner host imports the SDK without Prometheus or the embedded nats-server manager."""
    code = (
        "import sys, valkyrie.runner; "
        "bad = [m for m in ('prometheus_client', 'valkyrie.bus.server', 'valkyrie.runtime',"
        " 'valkyrie.gateway', 'handlers') if m in sys.modules]; "
        "print(','.join(bad))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "", f"valkyrie.runner imported {out.stdout.strip()}"


def test_version_is_the_installed_distribution() -> None:
    import importlib.metadata

    import valkyrie

    assert valkyrie.__version__ == importlib.metadata.version("valkyrie")
