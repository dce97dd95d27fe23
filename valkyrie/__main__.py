"""``python -m valkyrie`` runs the CLI."""

from valkyrie.cli import main

main()
