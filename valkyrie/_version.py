"""The installed Valkyrie version (``valkyrie.__version__``), importable from any floor."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

__all__ = ["__version__"]

try:
    __version__ = version("valkyrie")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"
