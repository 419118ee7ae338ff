"""Options generated from the settings: a command names the library dataclasses (or stage functions) it feeds,
and each of their settings becomes a ``--key`` option with the field's type, default, choices and help
(pipeline.settings, pipeline.settings_help).

The dataclasses live in modules that import torch, faiss or pyarrow (seconds), so ``--help`` reads their
options from pipeline/cli/catalog.json, which ``python -m pipeline.cli.catalog`` writes from the dataclasses
(without the file, they are read from the dataclasses: slower, same options). A command checks the catalog
against its dataclasses before it runs (a stale one is a bug: exit 1), and tests/test_structure.py checks
every command's. Option values reach the command through :func:`given`.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
import typer.main
from typer.core import TyperCommand

from pipeline import settings
from pipeline.config import PRESETS
from pipeline.settings_help import HELP, choices, help_text

CATALOG = Path(__file__).with_name("catalog.json")
REGENERATE = "python -m pipeline.cli.catalog"
_GIVEN = "landmark_index.settings"  # where the settings' values wait in the command's context
_TYPES = {"str": str, "int": int, "float": float, "bool": bool}

# A str, not a Literal: PRESETS is a registry that can grow at run time (the library checks the name);
# the shell still completes the names registered when it asks.
Preset = Annotated[
    str,
    typer.Option("--preset", autocompletion=lambda: list(PRESETS), help=HELP["preset"]),
]
Address = Annotated[str | None, typer.Option("--address", help=HELP["address"])]


class SettingsCommand(TyperCommand):
    """A typer command whose options also include the settings of ``sources``."""

    sources: tuple[str, ...] = ()  # "module:Name" of the dataclasses / stage functions
    exclude: frozenset[str] = frozenset()  # fields (``Owner.field`` or a name) the command sets itself
    unset: frozenset[str] = frozenset()  # fields whose options default to unset (another value applies)

    @property
    def params(self) -> list[Any]:
        """typer's parameters, then the settings' (one list: click appends and pops its help option on it)."""
        if self._settings is None:
            recorded = _catalog().get(self.name)
            self._settings = setting_options(self.describe() if recorded is None else recorded)
            self._params += self._settings
        return self._params

    @params.setter
    def params(self, value: list[Any]) -> None:
        self._params, self._settings = list(value), None

    def describe(self) -> list[dict[str, Any]]:
        """The command's options as the catalog records them, from the dataclasses (imports them)."""
        found = [s for source in self.sources for s in settings.settings_of(_resolve(source), self.exclude)]
        return [describe(s, _named(s, self.unset)) for s in found]

    def invoke(self, ctx: typer.Context) -> Any:
        recorded = _catalog().get(self.name)
        if recorded is not None and recorded != self.describe():
            raise RuntimeError(f"{CATALOG} is stale for `{self.name}`: run {REGENERATE}")
        names = {option.name for option in self._settings or ()}
        ctx.meta[_GIVEN] = {name: ctx.params.pop(name) for name in names if name in ctx.params}
        return super().invoke(ctx)


def settings_command(*sources: str, exclude: Iterable[str] = (), unset: Iterable[str] = ()) -> type:
    """``app.command(cls=...)`` for a command whose options include every setting of ``sources``
    (``"module:Name"``) but ``exclude``; the ``unset`` fields (``Owner.field`` or a name) default to None."""
    attributes = {"sources": sources, "exclude": frozenset(exclude), "unset": frozenset(unset)}
    return type("SettingsCommand", (SettingsCommand,), attributes)


def given(ctx: typer.Context) -> dict[str, Any]:
    """The setting options of the command ``ctx`` runs, by setting key (what ``settings.build`` takes)."""
    return dict(ctx.meta[_GIVEN])


def describe(setting: settings.Setting, unset: bool = False) -> dict[str, Any]:
    """``setting`` as one catalog entry: key, owner, type, default (None when ``unset``), choices, help."""
    if not all(k in settings.SCALARS for k in setting.kinds):
        raise TypeError(f"{setting.owner.__name__}.{setting.field}: {setting.type} has no flag; exclude it")
    return {
        "key": setting.key,
        "owner": setting.owner.__name__,
        "type": setting.kinds[0].__name__,
        "optional": setting.optional or unset,
        "required": setting.required,
        "default": None if unset or setting.required else setting.default,
        "choices": list(choices(setting) or ()) or None,
        "help": help_text(setting),
    }


def setting_options(entries: list[dict[str, Any]]) -> list[Any]:
    """One ``--key`` per catalog entry, typed (a bool: ``--key/--no-key``; choices: one of them) and
    defaulted as the entry says, with its help: typer builds them from a signature."""
    scratch = typer.Typer(add_completion=False)
    scratch.command()(_signed([_parameter(entry) for entry in entries]))
    return typer.main.get_command(scratch).params


def _parameter(entry: dict[str, Any]) -> inspect.Parameter:
    kind: Any = _TYPES[entry["type"]] if entry["choices"] is None else Literal[tuple(entry["choices"])]
    if entry["optional"]:
        kind = kind | None
    default = inspect.Parameter.empty if entry["required"] else entry["default"]
    annotation = Annotated[kind, typer.Option(help=entry["help"])]
    return inspect.Parameter(
        entry["key"], inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation
    )


def _signed(parameters: list[inspect.Parameter]) -> Any:
    def command(**values: Any) -> None:
        """The settings' options (never run: only its signature is read)."""

    command.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in parameters}
    return command


@functools.cache
def _catalog() -> dict[str, list[dict[str, Any]]]:
    return json.loads(CATALOG.read_text()) if CATALOG.exists() else {}


def _resolve(source: str) -> Any:
    module, _, name = source.partition(":")
    return getattr(importlib.import_module(module), name)


def _named(setting: settings.Setting, names: frozenset[str]) -> bool:
    return setting.field in names or f"{setting.owner.__name__}.{setting.field}" in names
