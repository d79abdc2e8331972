"""The guides' links lead somewhere: every relative link names a file that exists, and every link to a line of code
(`[`GPT.forward`](../src/tinylm/model/gpt.py#L182)`) lands on the definition it names, so an edit that moves the code
shows up here rather than as a wrong link."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [*sorted((REPO / "docs").glob("*.md")), REPO / "README.md"]
LINK = re.compile(r"\[([^\]]*)\]\(([^)\s]+)\)")


def relative_links(page: Path) -> list[tuple[str, str]]:
    """(text, target) of each link that points into the repository."""
    return [(text, target) for text, target in LINK.findall(page.read_text()) if not re.match(r"\w+:|#", target)]


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO)))
def test_relative_links_lead_to_files(page):
    for _, target in relative_links(page):
        path = (page.parent / target.split("#")[0]).resolve()
        assert path.exists(), f"{page.name} links to {target}, which does not exist"


def definition_line(source: list[str], dotted: str) -> int | None:
    """The line number of `class A` / `def f`, or of `def f` inside `class A` for "A.f"."""
    start = 0
    for name in dotted.split("."):
        definition = re.compile(rf"\s*(def|class) {name}\b")
        start = next((n for n, text in enumerate(source[start:], start + 1) if definition.match(text)), None)
        if start is None:
            return None
    return start


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO)))
def test_line_links_land_on_the_definition_they_name(page):
    for text, target in relative_links(page):
        line = re.fullmatch(r"(.+\.py)#L(\d+)", target)
        if line:
            source = (page.parent / line.group(1)).read_text().splitlines()
            now = definition_line(source, text.strip("`"))
            assert now == int(line.group(2)), f"{page.name}: {target} should point at {text}, now on line {now}"


def test_every_guide_is_in_the_index():
    index = (REPO / "docs" / "README.md").read_text()
    for page in PAGES:
        if page.parent.name == "docs" and page.name != "README.md":
            assert f"]({page.name}" in index, f"docs/README.md does not link {page.name}"
