"""Command-line options shared by several command groups (one definition each)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

# Help texts go through Rich markup: an unescaped "[env FEDVAULT_HOME]" reads
# as a style tag and vanishes from --help.
HomeOpt = Annotated[
    Path | None,
    typer.Option("--home", help=escape("Federation state directory [env FEDVAULT_HOME].")),
]
