"""Settings declared once: a setting is a field of a library dataclass (or a keyword-only parameter of a stage
function, such as build_index's ``factory``), and every front end reads it from there.

The run config's sections (pipeline.runconfig), the jobs' arguments (jobs/), the CLI's options
(pipeline.cli.options) and docs/configuration.md (pipeline.settings_doc) all list a dataclass's settings with
``settings_of``: its fields, a nested dataclass's fields in its place (``ExtractionJob.store`` →
``global_dtype``, ``local_dtype``, ...), each under the one spelling files and flags use (``SPELLINGS``), with
its one help text (pipeline.settings_help). A new field is thereby a new run-config key, job argument and CLI
option (after ``python -m pipeline.cli.catalog``; tests/test_structure.py says when). Unset is ``None``
everywhere.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.errors import ConfigError
from pipeline.settings_help import choices, help_text

# Library field → the key / flag spelling, where the field's own name would read wrongly outside its class.
SPELLINGS = {
    "weights_url": "weights",  # --weights, [extract] weights: a URL or "imagenet"
    "allow_local_outside_root": "allow_local_files",  # --allow-local-files: the opt-in says what it allows
    "QualityConfig.target": "target_recall",  # [index] target_recall: "target" alone says nothing
    "QualityConfig.queries": "recall_sample",  # [index] recall_sample: not the [data] queries manifest
    "QualityConfig.query_store": "recall_queries",  # --recall-queries STORE: the recall report's queries
    "evaluate.landmarks_url": "landmarks",  # evaluate --landmarks
    "evaluate.out_url": "out",  # evaluate --out
}

SCALARS = (str, int, float, bool)

# No key, flag or job argument: untrusted-input guards (ExtractionJob, TrainJob) keep the library's values, and
# origin_manifest_url is what reindex sets on the subset manifests it writes.
GUARDS = {"allowed_schemes", "max_pixels", "origin_manifest_url"}


@dataclass(frozen=True)
class Setting:
    """One field of a library dataclass, as the front ends see it."""

    key: str  # the spelling in run configs and (with dashes) in flags
    owner: Any  # the dataclass (or stage function) that declares it
    field: str  # its name there
    type: Any  # the resolved annotation
    default: Any  # dataclasses.MISSING (inspect.Parameter.empty for a parameter) when required
    metadata: Mapping[str, Any] = dataclasses.field(
        default_factory=dict, compare=False
    )  # the field's ("help")

    @property
    def required(self) -> bool:
        return self.default is dataclasses.MISSING or self.default is inspect.Parameter.empty

    @property
    def optional(self) -> bool:
        return type(None) in typing.get_args(self.type)

    @property
    def kinds(self) -> tuple[Any, ...]:
        """The annotation's non-None alternatives: scalar types or ``tuple[T, ...]``."""
        args = typing.get_args(self.type) if _is_union(self.type) else (self.type,)
        return tuple(a for a in args if a is not type(None))


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def spelling(owner: Any, name: str) -> str:
    return SPELLINGS.get(f"{owner.__name__}.{name}", SPELLINGS.get(name, name))


def default_of(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _declared(source: Any) -> list[tuple[str, Any, Mapping[str, Any]]]:
    """(name, default, metadata) of a dataclass's fields, or of a stage function's keyword-only parameters
    but its progress hooks (``on_*``: the caller's display, not a setting)."""
    if dataclasses.is_dataclass(source):
        return [(f.name, default_of(f), f.metadata) for f in dataclasses.fields(source)]
    parameters = inspect.signature(source).parameters.values()
    return [
        (p.name, p.default, {})
        for p in parameters
        if p.kind is inspect.Parameter.KEYWORD_ONLY and not p.name.startswith("on_")
    ]


def settings_of(source: Any, exclude: Iterable[str] = ()) -> list[Setting]:
    """The settings of a dataclass (nested dataclasses flattened) or of a stage function's keyword-only
    parameters; ``exclude`` names fields (``Owner.field`` or a field name) that the caller sets itself. A
    field no file or flag can spell (not a scalar, an optional scalar or a tuple of scalars) must be
    excluded: it raises TypeError otherwise."""
    skip = set(exclude)
    hints = typing.get_type_hints(source)
    out: list[Setting] = []
    for name, default, metadata in _declared(source):
        if name in skip or f"{source.__name__}.{name}" in skip:
            continue
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            out += settings_of(annotation, skip)
            continue
        setting = Setting(spelling(source, name), source, name, annotation, default, metadata)
        if not all(k in SCALARS or _is_scalar_tuple(k) for k in setting.kinds):
            raise TypeError(f"{source.__name__}.{name}: {annotation} has no key or flag spelling; exclude it")
        out.append(setting)
    keys = [s.key for s in out]
    if len(keys) != len(set(keys)):
        raise TypeError(
            f"{source.__name__}: settings share a key: {sorted({k for k in keys if keys.count(k) > 1})}"
        )
    return out


def _is_scalar_tuple(kind: Any) -> bool:
    args = typing.get_args(kind)
    return typing.get_origin(kind) is tuple and len(args) == 2 and args[0] in SCALARS and args[1] is ...


def check_value(setting: Setting, value: Any, where: str) -> Any:
    """``value`` as ``setting`` takes it (a list becomes a tuple, an int a float); raises ValueError naming
    ``where`` when its type is wrong. An empty string is unset for an optional setting (TOML has no null)."""
    if setting.optional and (value is None or value == ""):
        return None
    for kind in setting.kinds:
        if kind is float and type(value) in (int, float):
            return float(value)
        if kind in SCALARS and type(value) is kind:
            return value
        if _is_scalar_tuple(kind) and isinstance(value, list | tuple):
            item = typing.get_args(kind)[0]
            if all(type(v) is item or (item is float and type(v) is int) for v in value):
                return tuple(item(v) for v in value)
    names = " or ".join(_type_name(k) for k in setting.kinds)
    raise ConfigError(f"{where}={value!r} must be {names}{' (or unset)' if setting.optional else ''}")


def _type_name(kind: Any) -> str:
    if _is_scalar_tuple(kind):
        return f"a list of {typing.get_args(kind)[0].__name__}"
    return kind.__name__


def build(cls: type, values: Mapping[str, Any], **given: Any) -> Any:
    """A ``cls`` from setting values by key (absent, None, or "" for an optional field: the field's default)
    and fields ``given`` by name (what the caller sets itself), nested dataclasses built the same way."""
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        value = values.get(spelling(cls, f.name))
        if f.name in given:
            kwargs[f.name] = given[f.name]
        elif dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = build(hints[f.name], values)
        elif value is not None and not (value == "" and type(None) in typing.get_args(hints[f.name])):
            kwargs[f.name] = value
    return cls(**kwargs)


def keyword_arguments(function: Any, values: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword-only parameters of ``function`` that ``values`` sets (not None or ""), by parameter name."""
    names = [name for name, _, _ in _declared(function)]
    return {
        n: values[spelling(function, n)] for n in names if values.get(spelling(function, n)) not in (None, "")
    }


# ---------------------------------------------------------------- jobs' arguments


def add_job_arguments(parser: argparse.ArgumentParser) -> None:
    """What every Ray job takes beside its inputs and settings: the cluster and its progress lines' period."""
    parser.add_argument(
        "--address", help="Ray address; default: $RAY_ADDRESS (set inside a Ray job), else local."
    )
    parser.add_argument(
        "--progress-interval",
        type=float,
        default=30.0,
        help="Seconds between progress lines in the job logs.",
    )


def job_address(args: argparse.Namespace) -> str | None:
    """The Ray cluster a job joins: --address, else the one a submitted job runs in, else a local Ray."""
    return args.address or os.environ.get("RAY_ADDRESS") or None


def add_arguments(parser: argparse.ArgumentParser, settings: Iterable[Setting]) -> None:
    """One ``--key`` per setting, typed, defaulted and explained as the field (pipeline.settings_help)."""
    for s in settings:
        flag, text = f"--{s.key.replace('_', '-')}", help_text(s)
        if s.required:
            parser.add_argument(flag, dest=s.key, required=True, type=_parser(s), help=text)
        elif bool in s.kinds:
            parser.add_argument(
                flag, dest=s.key, action=argparse.BooleanOptionalAction, default=s.default, help=text
            )
        else:
            shown = f"{text} Default: %(default)s."
            kwargs = {"choices": choices(s)} if choices(s) else {}
            parser.add_argument(flag, dest=s.key, type=_parser(s), default=s.default, help=shown, **kwargs)


def _parser(setting: Setting) -> Any:
    """argparse's ``type``: the field's scalar, a comma-separated list for a tuple; "" unsets an optional one
    (what an empty environment variable in a job's command line gives)."""
    kind = setting.kinds[0]
    if _is_scalar_tuple(kind):
        item = typing.get_args(kind)[0]
        parse = lambda text: tuple(item(v) for v in text.split(","))  # noqa: E731
    else:
        parse = kind
    if not setting.optional:
        return parse
    return lambda text: None if text == "" else parse(text)
