"""Valkyrie's handler workers; each module registers itself as a ``valkyrie.handlers`` entry point.

Handlers stay thin: decode, call the domain logic in :mod:`valkyrie`, persist, publish.
"""

__all__: list[str] = []
