"""The README's command table names every command of the CLI and every option of each, so that a new command or
option cannot stay undocumented (`--config`, `--set`, `--help` and `--json` are common to many and said once)."""

import re
from pathlib import Path

import typer.main

from surgvqa import cli

README = Path(__file__).resolve().parents[1] / "README.md"
COMMON = {"--config", "--set", "--help", "--json"}


def _table_rows() -> dict[str, str]:
    rows = {}
    for line in README.read_text(encoding="utf-8").splitlines():
        if match := re.match(r"\| `([a-z][a-z-]*)[ `]", line):
            rows[match.group(1)] = line
    return rows


def test_every_command_and_option_is_in_the_readme_command_table():
    rows = _table_rows()
    undocumented = []
    for name, command in typer.main.get_command(cli.app).commands.items():
        row = rows.get(name)
        if row is None:
            undocumented.append(name)
            continue
        for parameter in command.params:
            names = [option for option in (*parameter.opts, *parameter.secondary_opts) if option.startswith("--")]
            if names and not set(names) & COMMON and not any(re.search(rf"{option}\b", row) for option in names):
                undocumented.append(f"{name} {'/'.join(names)}")
    assert not undocumented, f"README.md's command table misses: {', '.join(undocumented)}"
