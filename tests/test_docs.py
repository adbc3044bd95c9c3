"""The README and docs/*.md: every relative link and #anchor resolves, and the front page stays a front page.

Anchors follow GitHub's rules for heading ids: the heading's text, lowercased, without punctuation other
than - and _, spaces turned into -, and -1, -2, ... added to repeats. Links inside code are not links.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest
from conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"(`+)(.+?)\1", re.DOTALL)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_LINK = re.compile(r"""<(?:a|img)\b[^>]*?\b(?:href|src)\s*=\s*["']([^"']+)["']""", re.IGNORECASE)
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.+?)[ \t#]*$", re.MULTILINE)
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # http:, https:, mailto:, ...


def prose(text: str) -> str:
    """The text without fenced code blocks (a heading or a link inside one is neither)."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    text = text.replace("`", "").replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for match in HEADING.finditer(prose(page.read_text(encoding="utf-8"))):
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    found |= set(re.findall(r"""<a\s+(?:name|id)=["']([^"']+)["']""", page.read_text(encoding="utf-8")))
    return found


def links(page: Path) -> list[str]:
    text = INLINE_CODE.sub("", prose(page.read_text(encoding="utf-8")))
    return [m.group(1) for m in LINK.finditer(text)] + HTML_LINK.findall(text)


def test_slug_follows_github():
    assert slug("The run folder (`runs/<time>-<arch>-<strategy>/`)") == "the-run-folder-runstime-arch-strategy"
    assert slug('An honest "unknown"') == "an-honest-unknown"
    assert slug("Training on a GPU or a Mac? Run `selftest` first") == "training-on-a-gpu-or-a-mac-run-selftest-first"
    assert slug("Colab, Kaggle, Jupyter") == "colab-kaggle-jupyter"
    assert slug("snake_case and-dash") == "snake_case-and-dash"


def test_link_extraction_skips_code():
    page_text = "see [a](x.md#y) and `[b](not-a-link.md)`\n```\n[c](nor-this.md)\n```\n![pic](p.png)\n"
    assert [m.group(1) for m in LINK.finditer(INLINE_CODE.sub("", prose(page_text)))] == ["x.md#y", "p.png"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_and_anchor_resolves(page):
    broken = []
    for target in links(page):
        if EXTERNAL.match(target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / unquote(path)).resolve() if path else page
        if not dest.is_relative_to(REPO) or not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and (dest.suffix != ".md" or unquote(anchor) not in anchors(dest)):
            broken.append(f"{target}: no heading with that anchor in {dest.relative_to(REPO)}")
    assert not broken, f"{page.relative_to(REPO)}: broken links: {broken}"


def test_every_docs_page_is_linked_from_the_front_page():
    linked = {(REPO / t.partition("#")[0]).resolve() for t in links(REPO / "README.md") if not EXTERNAL.match(t)}
    orphans = [p.name for p in PAGES[1:] if p.resolve() not in linked]
    assert not orphans, f"docs pages not linked from README.md: {orphans}"


def test_the_two_setup_commands_open_the_front_page():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    first_block = re.search(r"^```[^\n]*\n(.*?)^```", readme, re.MULTILINE | re.DOTALL)
    assert first_block and "make run" in first_block.group(1) and "make test" in first_block.group(1)
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    assert re.search(r"^run:", makefile, re.MULTILINE) and re.search(r"^test:", makefile, re.MULTILINE)
