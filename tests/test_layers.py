"""The layering of the code: a module imports only from its own layer or below (read with ast, nothing runs).

Every import counts, at module level or inside a function, except those under ``if TYPE_CHECKING:`` (they
never run). A function-level import may load a heavy package late (torch, faiss, ray: a comment says why);
it may not reach up a layer to dodge an import cycle.

Rooms stay small: a module under pipeline/ over MAX_LINES lines says why in its docstring.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 450
LONG_REASON = f"Longer than {MAX_LINES} lines because"  # a docstring line starting so states the reason

# Lowest first. A module belongs to the layer of its longest listed prefix.
LAYERS: list[tuple[str, str, tuple[str, ...]]] = [
    (
        "foundation",
        "error types, lazy exports, shared choices, metrics, resource probes: import nothing",
        (
            "pipeline",
            "pipeline.errors",
            "pipeline.lazy",
            "pipeline.choices",
            "pipeline.metrics",
            "pipeline.resources",
        ),
    ),
    ("storage", "the one module that talks to storage", ("pipeline.storage",)),
    (
        "runtime",
        "where work runs (Ray start-up, the execution seam): knows no stage",
        ("pipeline.ray_runtime", "pipeline.execution"),
    ),
    (
        "formats",
        "each file format's one owner, and safe image bytes",
        (
            "pipeline.store",
            "pipeline.results",
            "pipeline.manifest",
            "pipeline.images",
            "pipeline.index.io",
            "pipeline.lease",
            "pipeline.versions",
            "pipeline.runpaths",
        ),
    ),
    (
        "config",
        "presets and the settings dataclasses they are made of (no torch, no faiss); every setting's spelling and help",
        (
            "pipeline.config",
            "pipeline.model.catalog",
            "pipeline.rerank.config",
            "pipeline.index.params",
            "pipeline.settings",
            "pipeline.settings_help",
        ),
    ),
    (
        "model",
        "the DELG network and its weights; the extractor around it",
        ("pipeline.model", "pipeline.features"),
    ),
    (
        "stages",
        "one library function per stage (stages may call each other: a shortlist needs the index)",
        (
            "pipeline.extraction",
            "pipeline.index",
            "pipeline.rerank",
            "pipeline.evaluate",
            "pipeline.train",
            "pipeline.train_data",
            "pipeline.aggregate",
            "pipeline.convert",
            "pipeline.embedding_map",
            "pipeline.query",
        ),
    ),
    (
        "orchestration",
        "runs of several stages and their reports",
        ("pipeline.run", "pipeline.runconfig", "pipeline.reindex", "pipeline.report", "pipeline.demo"),
    ),
    (
        "front ends",
        "thin shells: CLI, query service, Ray jobs, and the configuration reference generated from the CLI",
        ("pipeline.boundary", "pipeline.cli", "pipeline.serve", "pipeline.settings_doc", "jobs"),
    ),
]


def layer_of(module: str) -> int:
    """The index in LAYERS of ``module``'s longest listed prefix."""
    best, found = -1, None
    for rank, (_, _, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, found = len(prefix), rank
    if found is None:
        raise KeyError(f"{module} is in no layer: add it to LAYERS")
    return found


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) of every project import in ``path`` that runs (not under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text(), str(path))
    type_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for inner in ast.walk(node)
    }
    found = []
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "pipeline":  # from pipeline import storage: the submodule (or __version__)
                found += [(node.lineno, f"pipeline.{alias.name}") for alias in node.names]
            elif node.module.split(".")[0] in ("pipeline", "jobs"):
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [
                (node.lineno, a.name) for a in node.names if a.name.split(".")[0] in ("pipeline", "jobs")
            ]
    return found


def project_modules() -> list[Path]:
    return sorted([*(ROOT / "pipeline").rglob("*.py"), *(ROOT / "jobs").glob("*.py")])


def test_every_module_has_a_layer() -> None:
    for path in project_modules():
        layer_of(module_name(path))


def test_no_module_imports_a_higher_layer() -> None:
    wrong = []
    for path in project_modules():
        here = layer_of(module_name(path))
        for line, target in imports(path):
            if target == "pipeline.__version__":
                target = "pipeline"
            if layer_of(target) > here:
                wrong.append(
                    f"{path.relative_to(ROOT)}:{line}: {LAYERS[here][0]} imports {target} ({LAYERS[layer_of(target)][0]})"
                )
    assert not wrong, "lower layers import higher ones:\n" + "\n".join(wrong)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from pipeline.run import RunPaths\n", [(1, "pipeline.run")]),
        ("def f():\n    from pipeline import report\n", [(2, "pipeline.report")]),
        ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pipeline.cli import app\n", []),
        ("import numpy\nimport pipeline.store.read\n", [(2, "pipeline.store.read")]),
    ],
)
def test_imports_are_read_where_they_run(tmp_path: Path, source: str, expected: list) -> None:
    path = tmp_path / "m.py"
    path.write_text(source)
    assert imports(path) == expected


def test_an_upward_import_is_caught() -> None:
    """The check can fail: storage importing the run, or a stage the CLI, is a higher layer."""
    assert layer_of("pipeline.run") > layer_of("pipeline.storage.atomic")
    assert layer_of("pipeline.cli") > layer_of("pipeline.extraction.stage")
    assert layer_of("pipeline.index.io") < layer_of("pipeline.index.build")  # a format inside a stage package
    with pytest.raises(KeyError, match="no layer"):
        layer_of("elsewhere.module")


def too_long(path: Path) -> bool:
    """Over MAX_LINES lines without a docstring line starting with LONG_REASON."""
    text = path.read_text()
    if len(text.splitlines()) <= MAX_LINES:
        return False
    docstring = ast.get_docstring(ast.parse(text, str(path))) or ""
    return not any(line.strip().startswith(LONG_REASON) for line in docstring.splitlines())


def test_no_module_is_longer_than_the_limit_without_a_reason() -> None:
    long = [
        f"{path.relative_to(ROOT)}: {len(path.read_text().splitlines())} lines"
        for path in (ROOT / "pipeline").rglob("*.py")
        if too_long(path)
    ]
    assert not long, (
        f"split these along their ideas, or start a docstring line {LONG_REASON!r}:\n" + "\n".join(long)
    )


def test_the_length_check_can_fail(tmp_path: Path) -> None:
    body = "x = 1\n" * MAX_LINES
    cases = {
        "at_limit": '"""A module."""\n' + "x = 1\n" * (MAX_LINES - 1),
        "over": '"""A module."""\n' + body,
        "reasoned": f'"""A module.\n\n{LONG_REASON} its one idea is long."""\n' + body,
        "reason_in_code": f'"""A module."""\n# {LONG_REASON} a comment is not the docstring.\n' + body,
    }
    for name, text in cases.items():
        (tmp_path / f"{name}.py").write_text(text)
    assert {name: too_long(tmp_path / f"{name}.py") for name in cases} == {
        "at_limit": False,
        "over": True,
        "reasoned": False,
        "reason_in_code": True,
    }
