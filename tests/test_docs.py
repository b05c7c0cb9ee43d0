"""The spec ships with the code: every section the code cites exists in docs/."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [p for folder in ("tvkd", "baselines", "studies", "reports", "tests") for p in (ROOT / folder).rglob("*")
           if p.suffix in (".py", ".yaml", ".md")] + [ROOT / "README.md", ROOT / "noxfile.py"]
CITATION = re.compile(r"docs/(\w+)\.md((?:(?:,\s*|\s+and\s+|\s*\+\s*|\s+)§[A-Z]?\d+(?:\.\d+)*)*)")
SECTION = re.compile(r"§([A-Z]?\d+(?:\.\d+)*)")


def citations() -> list[tuple[str, str, str]]:
    found = []
    for path in SOURCES:
        for m in CITATION.finditer(path.read_text(encoding="utf-8")):
            for sec in SECTION.findall(m.group(2)) or [""]:
                found.append((str(path.relative_to(ROOT)), m.group(1), sec))
    return found


def headings(doc: str) -> set[str]:
    text = (ROOT / "docs" / f"{doc}.md").read_text(encoding="utf-8")
    return {m.group(1) for m in re.finditer(r"^#{2,3} ([A-Z]?\d+(?:\.\d+)*) ", text, flags=re.M)}


def test_the_code_cites_the_docs():
    cited = citations()
    assert len(cited) >= 25
    assert {doc for _, doc, _ in cited} == {"methods", "testbed"}


@pytest.mark.parametrize("where,doc,section", citations(), ids=lambda x: str(x))
def test_cited_section_exists(where, doc, section):
    assert (ROOT / "docs" / f"{doc}.md").is_file(), f"{where} cites docs/{doc}.md, which does not exist"
    if section:
        assert section in headings(doc), f"{where} cites docs/{doc}.md §{section}, which has no such heading"


def test_no_citation_of_documents_outside_the_repository():
    stale = re.compile(r"\b(METHODS|TESTBED-NOTES|DESIGN)(\.md\b|\s*§)")  # a citation, not a constant named METHODS
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in SOURCES if p.name != "test_docs.py"
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if stale.search(line)]
    assert hits == []
