"""The README and the documentation site (docs/, built by MkDocs from mkdocs.yml): the README stays short and lists
exactly the registered methods, every relative link resolves, every page is in the site's navigation, and the site
builds with `mkdocs build --strict`."""
from __future__ import annotations

import configparser
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import HANG_GUARD_S, REPO

from promptlearn.methods import METHODS

README = REPO / "README.md"
DOCS = REPO / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)\)")


def prose(text: str) -> str:
    """The text without fenced blocks and inline code, where brackets are not links."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def slug(heading: str) -> str:
    """A heading's anchor as GitHub and MkDocs' toc spell it (for the headings these pages use)."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return re.sub(r"[ ]+", "-", text.strip())


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.S | re.M)
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, flags=re.M)}


def shown(path: Path) -> str:
    return path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) else str(path)


def broken_links(path: Path) -> list[str]:
    broken = []
    for target in LINK.findall(prose(path.read_text(encoding="utf-8"))):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        if not resolved.exists():
            broken.append(f"{target}: no {shown(resolved)}")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading '#{anchor}' in {shown(resolved)}")
    return broken


def section(text: str, title: str) -> str:
    start = text.index(f"\n{title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else len(text)]


def table_methods(text: str) -> list[str]:
    return [m.group(1) for m in re.finditer(r"^\| `(\w+)` \|", text, flags=re.M)]


def test_the_readme_is_under_200_lines():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) < 200, f"README.md has {len(lines)} lines: move the detail into a page of docs/"


def test_the_readme_method_table_lists_exactly_the_registered_methods():
    listed = table_methods(section(README.read_text(encoding="utf-8"), "## Methods"))
    assert len(listed) == len(set(listed)), f"a method listed twice: {listed}"
    assert sorted(listed) == sorted(METHODS), (
        f"README's method table: missing {sorted(set(METHODS) - set(listed))}, "
        f"not registered {sorted(set(listed) - set(METHODS))}")


def test_the_methods_page_lists_every_registered_method_with_its_page():
    text = (DOCS / "methods" / "index.md").read_text(encoding="utf-8")
    listed = table_methods(text)
    assert sorted(listed) == sorted(METHODS)
    for name in METHODS:
        row = re.search(rf"^\| `{name}` \| \[[^\]]+\]\(([\w.\-]+\.md)\) \|", text, flags=re.M)
        assert row and (DOCS / "methods" / row.group(1)).exists(), f"{name}: no page linked from docs/methods/index.md"


def test_the_readme_set_up_is_what_ci_runs():
    setup = section(README.read_text(encoding="utf-8"), "## Set-up").split("```")[1]
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    for command in setup.removeprefix("bash").strip().splitlines()[1:]:
        assert command in ci, f"the README's set-up command {command!r} is not what .ci/run runs"


@pytest.mark.parametrize("path", [README, *PAGES], ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_relative_link_resolves(path):
    assert not broken_links(path)


def test_the_link_check_finds_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[ok](#title) [gone](missing.md) [no anchor](#nowhere) `[code](x.md)`\n")
    assert [b.split(":")[0] for b in broken_links(page)] == ["missing.md", "#nowhere"]


def nav_pages(entries) -> list[str]:
    pages = []
    for entry in entries:
        value = entry if isinstance(entry, str) else next(iter(entry.values()))
        pages += nav_pages(value) if isinstance(value, list) else [value]
    return pages


def test_every_page_is_in_the_site_navigation():
    nav = nav_pages(yaml.safe_load((REPO / "mkdocs.yml").read_text(encoding="utf-8"))["nav"])
    assert len(nav) == len(set(nav))
    assert sorted(nav) == sorted(p.relative_to(DOCS).as_posix() for p in PAGES)


def test_a_method_page_shows_the_differences_rows_as_the_differences_page_does():
    """The rows a method page copies from "Differences from the original code" stay equal to that page's."""
    rows = set((DOCS / "differences.md").read_text(encoding="utf-8").splitlines())
    copied = 0
    for page in sorted((DOCS / "methods").glob("*.md")):
        text = page.read_text(encoding="utf-8")
        if "\n## Differences from the authors' code\n" not in text:
            continue
        part = section(text, "## Differences from the authors' code")
        if "](../differences.md)" not in part:
            continue  # the page's own list, not rows of the shared table
        for line in part.splitlines():
            if line.startswith("| ") and not line.startswith("| what |"):
                copied += 1
                assert line in rows, f"{page.name}: a row not in docs/differences.md: {line[:100]}"
    assert copied >= 20


def test_the_dev_extra_brings_the_documentation_tools():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    dev = cfg["options.extras_require"]["dev"]
    for tool in ("mkdocs", "mkdocs-material", "mkdocstrings"):
        assert re.search(rf"^{tool}\b", dev, flags=re.M), f"the dev extra lacks {tool}"


@pytest.mark.slow
@pytest.mark.subprocess
def test_the_site_builds_strictly(tmp_path):
    missing = [name for name in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")
               if importlib.util.find_spec(name.split(".")[0]) is None
               or (name.count(".") and importlib.util.find_spec(name) is None)]
    if missing:
        pytest.skip(f"the documentation tools are not installed ({', '.join(missing)}): pip install -e '.[dev]'")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                           str(REPO / "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
                          cwd=REPO, capture_output=True, text=True, env=env, timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "site" / "index.html").exists()
    assert (tmp_path / "site" / "methods" / "coop" / "index.html").exists()
    assert "RunConfig" in (tmp_path / "site" / "api" / "config" / "index.html").read_text(encoding="utf-8")
