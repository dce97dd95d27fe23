"""The layering contract (pyproject.toml, [tool.importlinter]) holds, and it does catch a breach."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests._helpers import ROOT

LINT = Path(sys.executable).parent / "lint-imports"


def _lint(cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT), "--no-cache"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(cwd), "PATH": str(LINT.parent)},
        check=False,
    )


@pytest.mark.slow
def test_a_pure_domain_module_importing_nats_breaks_the_contract(tmp_path: Path) -> None:
    for package in ("schemas", "valkyrie", "handlers"):
        shutil.copytree(ROOT / package, tmp_path / package)
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    kept = _lint(tmp_path)
    assert kept.returncode == 0, kept.stdout + kept.stderr
    modes = tmp_path / "valkyrie" / "domain" / "modes.py"
    modes.write_text(modes.read_text() + "\nimport nats  # a breach\n")
    runner = tmp_path / "valkyrie" / "runner" / "_shell.py"
    runner.write_text(runner.read_text() + "\nimport valkyrie.runtime.metrics  # a breach\n")
    broken = _lint(tmp_path)
    assert broken.returncode != 0
    assert "the domain is pure: no NATS, no event loop, no I/O floor BROKEN" in broken.stdout
    assert "the runner SDK needs no control plane, gateway or Prometheus BROKEN" in broken.stdout
    assert "valkyrie's floors only import downwards BROKEN" in broken.stdout


def _private_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        modules = []
        if isinstance(node, ast.ImportFrom) and node.module:
            modules = [node.module]
        elif isinstance(node, ast.Import):
            modules = [a.name for a in node.names]
        for module in modules:
            parts = module.split(".")
            if parts[0] == "valkyrie" and any(p.startswith("_") for p in parts[1:]):
                found.append(f"{path.name}: {module}")
    return found


def test_handlers_import_only_public_modules() -> None:
    """A new handler is a module plus an entry point, built on public code only."""
    private = [
        hit for path in sorted((ROOT / "handlers").glob("*.py")) for hit in _private_imports(path)
    ]
    assert private == []
