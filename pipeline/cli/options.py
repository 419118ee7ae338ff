"""Options generated from the settings: a command names the library dataclasses (or stage functions) it feeds,
and each of their settings becomes a ``--key`` option with the field's type, default, choices and help
(pipeline.settings, pipeline.settings_help).

The dataclasses live in modules that import torch, faiss or pyarrow, so a command names them as
``"module:Name"`` and its options are built the first time typer asks for them (that command's ``--help`` or
its run), never for ``landmark-index --help``. Their values reach the command through :func:`given` (the command takes ``ctx: typer.Context``).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterable
from typing import Annotated, Any, Literal

import typer
import typer.main
from typer.core import TyperCommand

from pipeline import settings
from pipeline.config import PRESETS
from pipeline.settings_help import HELP, choices, help_text

_GIVEN = "landmark_index.settings"  # the key of the settings' values in click's context

# A str, not a Literal: PRESETS is a registry that can grow at run time (the library checks the name);
# the shell still completes the names registered when it asks.
Preset = Annotated[
    str,
    typer.Option("--preset", autocompletion=lambda: list(PRESETS), help=HELP["preset"]),
]
Address = Annotated[str | None, typer.Option("--address", help=HELP["address"])]


def _resolve(source: str) -> Any:
    module, _, name = source.partition(":")
    return getattr(importlib.import_module(module), name)


class SettingsCommand(TyperCommand):
    """A typer command whose options also include the settings of ``sources`` (built on first use)."""

    sources: tuple[str, ...] = ()  # "module:Name" of the dataclasses / stage functions
    exclude: frozenset[str] = frozenset()  # fields (``Owner.field`` or a name) the command sets itself
    unset: frozenset[str] = frozenset()  # fields whose options default to unset (another value applies)

    @property
    def params(self) -> list[Any]:
        """typer's parameters, then the settings' (one list: click appends and pops its help option on it)."""
        if self._settings is None:
            self._settings = setting_options(self.settings(), self.unset)
            self._params += self._settings
        return self._params

    @params.setter
    def params(self, value: list[Any]) -> None:
        self._params, self._settings = list(value), None

    def settings(self) -> list[settings.Setting]:
        return [s for source in self.sources for s in settings.settings_of(_resolve(source), self.exclude)]

    def invoke(self, ctx: typer.Context) -> Any:
        names = {option.name for option in self._settings or ()}
        ctx.meta[_GIVEN] = {name: ctx.params.pop(name) for name in names if name in ctx.params}
        return super().invoke(ctx)


def settings_command(*sources: str, exclude: Iterable[str] = (), unset: Iterable[str] = ()) -> type:
    """``app.command(cls=...)`` for a command whose options include every setting of ``sources``
    (``"module:Name"``) but ``exclude``; the ``unset`` fields (``Owner.field`` or a name) default to None."""
    attributes = {"sources": sources, "exclude": frozenset(exclude), "unset": frozenset(unset)}
    return type("SettingsCommand", (SettingsCommand,), attributes)


def _named(setting: settings.Setting, names: frozenset[str]) -> bool:
    return setting.field in names or f"{setting.owner.__name__}.{setting.field}" in names


def given(ctx: typer.Context) -> dict[str, Any]:
    """The setting options of the command ``ctx`` runs, by setting key (what ``settings.build`` takes)."""
    return dict(ctx.meta[_GIVEN])


def setting_options(found: list[settings.Setting], unset: frozenset[str]) -> list[Any]:
    """One ``--key`` per setting, typed (a bool: ``--key/--no-key``; choices: one of them) and defaulted as
    its field (None for the ``unset`` fields), with its help: typer builds them from a signature."""
    parameters = [_parameter(s, _named(s, unset)) for s in found]
    scratch = typer.Typer()
    scratch.command()(_signed(parameters))
    return typer.main.get_command(scratch).params


def _parameter(setting: settings.Setting, unset: bool) -> inspect.Parameter:
    allowed = choices(setting)
    kind = setting.type if allowed is None else Literal[allowed]  # type: ignore[valid-type]
    if unset:
        kind = kind | None
    if any(k not in settings.SCALARS for k in setting.kinds):
        raise TypeError(f"{setting.owner.__name__}.{setting.field}: {setting.type} has no flag; exclude it")
    default = inspect.Parameter.empty if setting.required else (None if unset else setting.default)
    annotation = Annotated[kind, typer.Option(help=help_text(setting))]
    return inspect.Parameter(
        setting.key, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation
    )


def _signed(parameters: list[inspect.Parameter]) -> Any:
    def command(**values: Any) -> None:
        """The settings' options (never run: only its signature is read)."""

    command.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in parameters}
    return command
