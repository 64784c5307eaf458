"""The documentation site (docs/, built by MkDocs from mkdocs.yml) cannot drift either: its examples are
run as the README's are, its navigation lists every page and only pages that exist, and the README's
links into it resolve, anchors included."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
from test_readme import ROOT, Example, examples, prints_what_it_shows

DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))


def doc_examples() -> list[tuple[str, Example]]:
    """Every example of every page shown with its output, less those the README already runs."""
    in_readme = {(e.command, tuple(e.output)) for e in examples()}
    return [
        (page.relative_to(DOCS).as_posix(), example)
        for page in PAGES
        for example in examples(page)
        if (example.command, tuple(example.output)) not in in_readme
    ]


def test_the_docs_have_examples_with_output():
    shown = {page.relative_to(DOCS).as_posix(): len(examples(page)) for page in PAGES}
    assert shown["commands.md"] >= 3 and shown["precision.md"] >= 1 and shown["search.md"] >= 1
    assert doc_examples(), "every example of the docs is also the README's: none of them is run"


@pytest.mark.parametrize("page,example", doc_examples(), ids=lambda x: x if isinstance(x, str) else x.command[:60])
@pytest.mark.slow
def test_docs_example_prints_what_the_page_shows(page, example):
    prints_what_it_shows(example, f"docs/{page}")


def nav_pages() -> list[str]:
    """The pages mkdocs.yml's nav names (``- Title: page.md`` or ``- page.md``), in order."""
    text = (ROOT / "mkdocs.yml").read_text()
    nav = re.search(r"^nav:\n((?:[ \t]+.*\n?|\n)*)", text, re.MULTILINE)
    assert nav, "mkdocs.yml has no nav"
    return re.findall(r"^\s*-\s*(?:[^:\n]+:\s*)?(\S+\.md)\s*$", nav.group(1), re.MULTILINE)


def test_the_nav_lists_every_page_and_only_pages_that_exist():
    listed = nav_pages()
    assert len(listed) == len(set(listed)), f"pages listed twice: {listed}"
    on_disk = {page.relative_to(DOCS).as_posix() for page in PAGES}
    assert set(listed) == on_disk, (
        f"in docs/ but not in the nav: {sorted(on_disk - set(listed))}; "
        f"in the nav but not in docs/: {sorted(set(listed) - on_disk)}"
    )
    assert listed[0] == "index.md"


def slug(heading: str) -> str:
    """The anchor MkDocs' table of contents gives a heading (Python-Markdown's default slugify)."""
    text = re.sub(r"[`*]", "", heading)
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.MULTILINE | re.DOTALL)
    return {slug(h) for h in re.findall(r"^#{1,6}\s+(.*?)\s*$", text, re.MULTILINE)}


def test_slug_matches_mkdocs_for_the_headings_used_here():
    assert slug("Other families: open_clip and Hugging Face") == "other-families-open_clip-and-hugging-face"
    assert slug("Checking a precision: `bench-precision`") == "checking-a-precision-bench-precision"
    assert slug("The bundled model: `tiny-shapes`") == "the-bundled-model-tiny-shapes"


LINK = re.compile(r"\]\((?!https?://|mailto:)([^)\s]+)\)")


def test_the_readmes_links_into_the_docs_resolve():
    targets = LINK.findall((ROOT / "README.md").read_text())
    assert any(t.startswith("docs/") for t in targets)
    broken = []
    for target in targets:
        path, _, anchor = target.partition("#")
        file = ROOT / path
        if not file.is_file() or (anchor and file.suffix == ".md" and anchor not in anchors(file)):
            broken.append(target)
    assert not broken, f"README links that do not resolve: {broken}"


def test_the_site_builds_strictly(tmp_path):
    """What CI runs: a broken link, a missing anchor or a page outside the nav fails the build."""
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    assert (tmp_path / "site" / "reliability" / "index.html").is_file()
