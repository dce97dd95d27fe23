"""The ``valkyrie`` command line."""

from __future__ import annotations

from valkyrie.cli._common import ExitCode
from valkyrie.cli._main import cli, main

__all__ = ["ExitCode", "cli", "main"]
