"""The documentation refers only to what the repository holds: every relative link of README.md, docs/*.md and
k8s/README.md (and its #anchor) and every repository path they mention exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOP_LEVEL = ("pipeline", "jobs", "k8s", "tests", "benchmarks", "docs", "configs", "scripts", "requirements")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# a path from the checkout's root: a top-level folder, then path characters; `../shared/...` lies outside
REPO_PATH = re.compile(rf"(?<![\w./-])(?:{'|'.join(TOP_LEVEL)})/[\w./*-]*[\w/*]")
# placeholders a reader replaces (`jobs/NAME.py`, `part-NNNNN.parquet`, `overlays/YOURS/`)
PLACEHOLDER = re.compile(r"\b(?:NAME|YOURS|N{3,}|vN{3,})\b")


def documents() -> list[Path]:
    return [REPO / "README.md", REPO / "k8s" / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def anchors(markdown: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+\s+(.+)$", markdown.read_text(), flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def broken_references(markdown: Path, repo: Path) -> list[str]:
    """Each link whose file or #anchor is missing, and each mentioned repository path that matches nothing."""
    text = markdown.read_text()
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        resolved = (markdown.parent / path).resolve() if path else markdown
        if not resolved.exists():
            broken.append(f"link {target}")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"link {target}: no heading #{anchor}")
    prose = LINK.sub("", text)  # link targets were checked above, relative to the page
    for mention in set(REPO_PATH.findall(prose)):
        mention = mention.rstrip(".")
        if not PLACEHOLDER.search(mention) and not any(repo.glob(mention.rstrip("/"))):
            broken.append(f"path {mention}")
    return sorted(broken)


@pytest.mark.parametrize("markdown", documents(), ids=lambda p: str(p.relative_to(REPO)))
def test_documents_refer_only_to_files_in_the_repository(markdown: Path) -> None:
    assert broken_references(markdown, REPO) == []


def test_readme_stays_short_and_links_every_docs_page() -> None:
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    pages = {f"docs/{p.name}" for p in (REPO / "docs").glob("*.md")}
    assert {
        "docs/formats.md",
        "docs/configuration.md",
        "docs/failure-modes.md",
        "docs/benchmarks.md",
    } <= pages
    assert pages <= set(LINK.findall(readme)), "every docs/ page is linked from the README"
    assert "make test" in readme and "make demo" in readme


def test_the_checker_finds_broken_links_anchors_and_paths(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# Title\n\n## Some section\n")
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "store.py").write_text("")
    page = tmp_path / "README.md"
    page.write_text(
        "[ok](docs/a.md) [ok](docs/a.md#some-section) [web](https://example.com/x) [gone](docs/b.md)\n"
        "[bad anchor](docs/a.md#other) `pipeline/store.py` `pipeline/stores.py`, jobs/NAME.py and `docs/*.md`\n"
        "`../shared/data/x.jpg`, `pipeline/index/` and `pipeline/*.toml`.\n"
    )
    assert broken_references(page, tmp_path) == [
        "link docs/a.md#other: no heading #other",
        "link docs/b.md",
        "path pipeline/*.toml",
        "path pipeline/index/",
        "path pipeline/stores.py",
    ]
