#!/usr/bin/env python
"""Fail when the built docs site shows docstring markup that did not render.

    python .ci/check_docs_html.py SITE_DIR

`mkdocs build --strict` passes on reST roles, directives and doctest lines that Markdown reads as
quotes, so this looks at the HTML itself. Outside <code>/<pre> it reports:
- reST roles (:func:, :class:, :meth:, :mod:, :attr:, :data:, :exc:, :obj:),
- reST directives (.. code-block::, .. note:: ...) and literal-block markers ending a paragraph in ::,
- doctest prompts (>>>), which render as code only inside an Examples section,
- reST table borders (``=====  =====``: a simple table read as a paragraph),
- <blockquote> elements (Markdown's reading of '>>>' lines; the docs use none on purpose),
- unresolved autorefs (<autoref> elements left in the page).
Each finding is printed with its page and a snippet; the exit status is the number of pages with
findings (capped at 1).
"""

from __future__ import annotations

import re
import sys
from html.parser import HTMLParser
from pathlib import Path

ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|data|exc|obj|const):")
DIRECTIVE = re.compile(r"\.\. [a-zA-Z-]+::")
DOCTEST = re.compile(r">>>")
LITERAL_MARKER = re.compile(r"\w::\s*$")
TABLE_BORDER = re.compile(r"={4,}\s+={2,}")


class Text(HTMLParser):
    """Collects the page text outside <code>, <pre>, <script>, <style> and counts <blockquote>s."""

    SKIP = frozenset({"code", "pre", "script", "style"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.depth = 0
        self.chunks: list[str] = []
        self.blockquotes = 0
        self.autorefs = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.depth += 1
        elif tag == "blockquote":
            self.blockquotes += 1
        elif tag == "autoref":
            self.autorefs += 1

    def handle_endtag(self, tag):
        if tag in self.SKIP and self.depth:
            self.depth -= 1

    def handle_data(self, data):
        if not self.depth:
            self.chunks.append(data)


def findings(html: str) -> list[str]:
    parser = Text()
    parser.feed(html)
    text = "".join(parser.chunks)
    found = []
    for name, pattern in (("reST role", ROLE), ("reST directive", DIRECTIVE), ("doctest prompt >>>", DOCTEST),
                          ("reST table border", TABLE_BORDER)):
        for match in pattern.finditer(text):
            snippet = " ".join(text[max(0, match.start() - 60): match.end() + 60].split())
            found.append(f"{name}: ...{snippet}...")
    for line in text.splitlines():
        if LITERAL_MARKER.search(line):
            found.append(f"reST literal-block marker '::': {line.strip()[-100:]}")
    if parser.blockquotes:
        found.append(f"{parser.blockquotes} <blockquote> element(s)")
    if parser.autorefs:
        found.append(f"{parser.autorefs} unresolved cross-reference(s) (<autoref>)")
    return found


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    site = Path(argv[0])
    pages = sorted(site.rglob("*.html"))
    if not pages:
        print(f"check_docs_html: no HTML pages under {site}", file=sys.stderr)
        return 1
    bad = 0
    for page in pages:
        found = findings(page.read_text(encoding="utf-8"))
        if found:
            bad += 1
            print(f"{page.relative_to(site)}: {len(found)} finding(s)")
            for item in found[:20]:
                print(f"    {item}")
            if len(found) > 20:
                print(f"    ... and {len(found) - 20} more")
    print(f"check_docs_html: {len(pages)} page(s), {bad} with unrendered markup")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
