"""The user documentation holds together: every relative link resolves (files and heading anchors), the README
stays a short user guide, and config/README.md documents exactly the keys the config schema accepts."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest
import yaml

from .conftest import REPO

README_MAX_LINES = 300


def doc_files() -> list[Path]:
    files = [REPO / "README.md", REPO / "CHANGELOG.md", REPO / "config" / "README.md"]
    files += sorted((REPO / "docs").glob("*.md"))
    return files


FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
# [text](target) or [text](target "title"); also matches the [alt](src) part of an image.
LINK = re.compile(r"\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"", re.IGNORECASE)


def prose_lines(text: str):
    """(line number, line) outside fenced code blocks."""
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield number, line


def links(path: Path) -> list[tuple[int, str]]:
    """(line, target) of every markdown link outside code."""
    out = []
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        for match in LINK.finditer(INLINE_CODE.sub("", line)):
            out.append((number, match.group(1)))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: rendered text, lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images: their text
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"<[^>]+>", "", text)
    kept = [c for c in text.lower()
            if c in " -_" or unicodedata.category(c)[0] in "LNM"]
    return "".join(kept).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor a link into ``path`` may use (duplicate headings get -1, -2, ... as on GitHub)."""
    seen: dict[str, int] = {}
    found = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        found.update(HTML_ANCHOR.findall(line))
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def is_external(target: str) -> bool:
    return re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) is not None  # http:, https:, mailto:, ...


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(doc):
    assert doc.is_file(), f"{doc.relative_to(REPO)} is missing"
    broken = []
    for line, target in links(doc):
        if is_external(target):
            continue
        path_part, _, anchor = target.partition("#")
        dest = (doc.parent / path_part).resolve() if path_part else doc
        where = f"{doc.relative_to(REPO)}:{line}: {target}"
        if not dest.exists():
            broken.append(f"{where} (no such file)")
            continue
        if anchor and dest.suffix == ".md" and dest.is_file() and anchor not in anchors(dest):
            broken.append(f"{where} (no heading #{anchor} in {dest.name})")
    assert not broken, "broken links:\n  " + "\n  ".join(broken)


def test_docs_have_links_to_check():
    """Guards the parser: the README links to every page under docs/ and to the config reference."""
    targets = {t.partition("#")[0] for _, t in links(REPO / "README.md")}
    expected = {f"docs/{p.name}" for p in (REPO / "docs").glob("*.md")} | {"config/README.md", "CHANGELOG.md"}
    assert expected <= targets, f"README does not link to {sorted(expected - targets)}"


def test_readme_is_short():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; at most {README_MAX_LINES}"


def test_slug_matches_github():
    assert slug("GDC/TCGA cohorts and sizing") == "gdctcga-cohorts-and-sizing"
    assert slug("Optional: GAN refiner (SimGAN)") == "optional-gan-refiner-simgan"
    assert slug("Weights within strata of crowding: 18 GPU seeds, a small cost") == \
        "weights-within-strata-of-crowding-18-gpu-seeds-a-small-cost"
    assert slug("`model.checkpoint` and `snake_case`") == "modelcheckpoint-and-snake_case"


# ------------------------------------------------------------------------------------- config reference

def schema_keys(schema: dict, prefix: str = "") -> set[str]:
    """Dotted names of every key the config schema accepts (descending into nested objects' properties)."""
    keys = set()
    for name, sub in (schema.get("properties") or {}).items():
        key = f"{prefix}{name}"
        keys.add(key)
        if isinstance(sub, dict) and sub.get("properties"):
            keys |= schema_keys(sub, key + ".")
    return keys


def documented_keys() -> set[str]:
    """First-column code spans of the tables in config/README.md before its sample-sheet section."""
    keys = set()
    for _, line in prose_lines((REPO / "config" / "README.md").read_text(encoding="utf-8")):
        if re.match(r"^#{1,6}\s+Sample sheet", line):
            break
        match = re.match(r"^\|\s*`([A-Za-z_][A-Za-z0-9_.]*)`\s*\|", line)
        if match:
            keys.add(match.group(1))
    return keys


def test_config_reference_documents_every_key():
    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text(encoding="utf-8"))
    accepted, documented = schema_keys(schema), documented_keys()
    assert not accepted - documented, f"config/README.md does not document {sorted(accepted - documented)}"
    assert not documented - accepted, f"config/README.md documents keys the schema refuses: " \
                                      f"{sorted(documented - accepted)}"


def test_qc_signal_table_is_the_declarations():
    """docs/qc.md lists the QC signals as nucseg.grading declares them (name, how measured, level)."""
    from nucseg.grading import signals_table

    assert signals_table() in (REPO / "docs" / "qc.md").read_text()
