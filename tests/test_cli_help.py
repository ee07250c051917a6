"""Every option's help text reaches ``--help`` whole (Rich markup must not eat it)."""

from __future__ import annotations

import re

import click
import typer
from typer.testing import CliRunner

from fedvault.cli.main import app


def _commands(
    command: click.Command, path: tuple[str, ...] = ()
) -> list[tuple[tuple[str, ...], click.Command]]:
    found = [(path, command)]
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            found += _commands(sub, (*path, name))
    return found


def _flat(text: str) -> str:
    return re.sub(r"[\s│╭╮╰╯─]+", " ", text)


def test_every_option_help_is_shown_whole() -> None:
    root = typer.main.get_command(app)
    runner = CliRunner()
    checked = 0
    for path, command in _commands(root):
        result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "400"}, terminal_width=400)
        assert result.exit_code == 0, (path, result.output)
        shown = _flat(result.output)
        for param in command.params:
            text = getattr(param, "help", None)
            if not text:
                continue
            # Help texts carry no markup: what was written (escapes aside) is shown.
            want = _flat(text.replace("\\[", "["))
            assert want in shown, (path, param.name, want)
            checked += 1
    assert checked > 100  # the walk reached the whole command tree


def test_the_home_option_names_its_variable() -> None:
    result = CliRunner().invoke(app, ["runs", "list", "--help"], env={"COLUMNS": "200"})
    assert "Federation state directory [env FEDVAULT_HOME]." in result.output
