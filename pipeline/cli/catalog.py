"""Write pipeline/cli/catalog.json, the options of every command as its dataclasses declare them
(pipeline.cli.options): ``python -m pipeline.cli.catalog``. Run it after changing a setting or its help."""

from __future__ import annotations

import json
from typing import Any

import typer.main

from pipeline.cli import app
from pipeline.cli.options import CATALOG, SettingsCommand


def live_catalog() -> dict[str, list[dict[str, Any]]]:
    """Command → its setting options, read from the dataclasses (imports every stage module)."""
    commands = typer.main.get_command(app).commands
    return {
        name: command.describe()
        for name, command in sorted(commands.items())
        if isinstance(command, SettingsCommand)
    }


def render() -> str:
    """The catalog as JSON, one option a line (a changed setting is a one-line diff)."""
    commands = [
        f"{json.dumps(name)}: [\n"
        + ",\n".join(f"  {json.dumps(e, ensure_ascii=False)}" for e in entries)
        + "\n]"
        for name, entries in live_catalog().items()
    ]
    return "{\n" + ",\n".join(commands) + "\n}\n"


if __name__ == "__main__":
    CATALOG.write_text(render())
    print(f"wrote {CATALOG}")
