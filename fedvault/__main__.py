"""``python -m fedvault`` runs the CLI."""

from fedvault.cli.main import run

run()
