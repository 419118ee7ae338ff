"""The project's error types: what a user can fix, raised where input is checked (the lowest layer: imports nothing).

:mod:`pipeline.boundary` turns these into one line and exit code 2. Anything else escaping a command is a bug
and keeps its traceback (exit 1): a ``ValueError`` or ``KeyError`` from inside the library is not a user mistake.
The subclasses also derive from the built-in a caller would catch (``ValueError``, ``FileNotFoundError``), so
code that tests "not there" or "bad value" keeps working.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake or a fault of the user's environment that only the user can fix; its message says what and where."""


class ConfigError(UserError, ValueError):
    """A bad setting: a CLI option, a run config file, a preset, a combination of settings."""


class InputError(UserError, ValueError):
    """Bad input data: a manifest, a query list, a ground-truth file, a store, index or run folder that is
    malformed or does not fit the run (dimension, model, version)."""


class MissingInputError(UserError, FileNotFoundError):
    """An input the run needs does not exist (a manifest, weights, a store, an index, a published version)."""


class ResourcesUnavailableError(UserError):
    """The cluster did not provide what a run asked for within its deadline (e.g. GPUs no node has)."""


# What the boundary reports as one line and exit 2: only the project's own types, raised where input is checked.
# A ValueError, KeyError or FileNotFoundError from inside the library is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError,)
