"""The commands benchmarks/RESULTS.md and the benchmark scripts' docstrings document are the commands that run:
each is parsed by the script's own argument parser (or the CLI's), so a renamed or removed flag fails here
(issue 27: RESULTS.md still named `--num-extractors`)."""

from __future__ import annotations

import argparse
import ast
import re
import runpy
import shlex
from pathlib import Path

import pytest
import typer

from pipeline.cli import app

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPT = re.compile(r"(?:python\s+|\.\.\.\s+)(?:\S*/)?(bench_\w+\.py)\b((?:[^`\n\\]|\\\n)*)")
CLI = re.compile(r"(?<![\w-])landmark-index\s+([a-z][\w-]*)((?:[^`\n\\]|\\\n)*)")
PLACEHOLDER = re.compile(r"[A-Z][A-Z0-9_]*")  # STORES, W, B: a value the reader fills in


def documents() -> dict[str, str]:
    """RESULTS.md and every benchmark script's docstring, by name."""
    texts = {"RESULTS.md": (BENCHMARKS / "RESULTS.md").read_text()}
    for script in sorted(BENCHMARKS.glob("bench_*.py")):
        texts[script.name] = ast.get_docstring(ast.parse(script.read_text())) or ""
    return texts


def arguments(text: str) -> list[str]:
    """A documented command's arguments: continuations joined; comments, (remarks) and [optional] brackets
    dropped; of {a|b} alternatives the first."""
    text = re.sub(r"\s#.*", "", text.replace("\\\n", " "))
    text = re.sub(r"\{([^|}]*)\|[^}]*\}", r"\1", re.sub(r"\([^)]*\)", "", text))
    return shlex.split(text.replace("[", " ").replace("]", " "))


def documented(pattern: re.Pattern[str]) -> list[tuple[str, str, list[str]]]:
    return [
        (where, match.group(1), arguments(match.group(2)))
        for where, text in documents().items()
        for match in pattern.finditer(text)
    ]


SCRIPT_COMMANDS = documented(SCRIPT)
CLI_COMMANDS = documented(CLI)


def test_the_documents_hold_commands():
    assert len(SCRIPT_COMMANDS) >= 30 and len(CLI_COMMANDS) >= 1
    assert {name for _, name, _ in SCRIPT_COMMANDS} == {p.name for p in BENCHMARKS.glob("bench_*.py")}


def _filled(parser: argparse.ArgumentParser, args: list[str]) -> list[str]:
    """Placeholders of typed options replaced by a value of their type (`--batch-size B` → 1)."""
    types = {flag: action.type for action in parser._actions for flag in action.option_strings}
    filled = list(args)
    for i, value in enumerate(args[1:], start=1):
        kind = types.get(args[i - 1])
        if PLACEHOLDER.fullmatch(value) and kind in (int, float):
            filled[i] = "1"
    return filled


@pytest.mark.parametrize(
    ("where", "script", "args"),
    SCRIPT_COMMANDS,
    ids=[f"{w}:{s}:{i}" for i, (w, s, _) in enumerate(SCRIPT_COMMANDS)],
)
def test_a_documented_benchmark_command_parses(where, script, args, monkeypatch):
    """The script runs as `python SCRIPT ARGS` up to its argument parsing, then stops."""
    parse_args = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, given=None, namespace=None):
        parse_args(self, _filled(self, args), namespace)  # a bad flag: argparse exits 2
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.setattr("sys.argv", [script, *args])
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(BENCHMARKS / script), run_name="__main__")
    assert exited.value.code == 0, f"{where}: {script} {' '.join(args)} does not parse"


@pytest.mark.parametrize(
    ("where", "command", "args"), CLI_COMMANDS, ids=[f"{w}:{c}" for w, c, _ in CLI_COMMANDS]
)
def test_a_documented_cli_command_parses(where, command, args):
    """Each option a documented `landmark-index COMMAND ...` gives is an option of that command (prose may
    name a command without its arguments, so only the options are checked)."""
    commands = typer.main.get_command(app).commands
    assert command in commands, f"{where}: landmark-index {command} is no command"
    options = {o for p in commands[command].params for o in [*p.opts, *p.secondary_opts]} | {
        "--help"
    }  # click's own
    given = {a.split("=", 1)[0] for a in args if a.startswith("--")}
    assert given <= options, f"{where}: landmark-index {command} has no {sorted(given - options)}"
