"""HTML documentation pages → plain text, with nothing but Python's standard library.

Used by ``scripts/get-prose.sh`` (run as a script, so it imports nothing from the package) to turn
the HTML of Debian documentation packages into the prose corpus ``.cache/prose/text/``: one
``<relpath>.txt`` per ``<relpath>.html`` (the ``.html`` suffix replaced).

What is kept: the text of the page body, with block elements (paragraphs, headings, list items,
table rows, ``pre``) on lines of their own and ``pre`` blocks verbatim. What is dropped: ``head``,
scripts, styles, forms, navigation (``nav``, ``role="navigation"``/``"search"``), Sphinx's sidebar,
header/footer bars and permalink markers (the ``¶`` links), and index-like pages (``genindex``,
``search``, module indexes) that are lists of links rather than prose.

    python3 vllm_seer/eval/html_text.py SRC_ROOT DST_ROOT   # converts every *.html under SRC_ROOT
"""

from __future__ import annotations

import html.parser
import re
import sys
from pathlib import Path

SKIP_TAGS = {"head", "script", "style", "nav", "form", "noscript", "svg", "button", "select"}
SKIP_CLASSES = {"sphinxsidebar", "related", "footer", "mobile-nav", "headerlink", "navigation",
                "navheader", "navfooter", "toc", "sphinxsidebarwrapper"}
SKIP_ROLES = {"navigation", "search"}
BLOCK_TAGS = {"p", "div", "section", "article", "h1", "h2", "h3", "h4", "h5", "h6", "li", "ul",
              "ol", "dl", "dt", "dd", "tr", "table", "blockquote", "pre", "br", "hr", "title",
              "figure", "figcaption", "caption", "body"}
VOID_TAGS = {"br", "hr", "img", "input", "meta", "link", "area", "base", "col", "embed", "source",
             "track", "wbr", "param"}
SKIP_PAGES = ("genindex", "search.html", "py-modindex", "modindex", "index.en.html")
MIN_CHARS = 2000  # shorter pages (link lists, stubs) are not documents


class _TextParser(html.parser.HTMLParser):
    """Collects visible body text; ``self.parts`` are text pieces and ``"\\n"`` block breaks."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, bool]] = []  # (tag, this element starts a skipped subtree)
        self.skip = 0
        self.pre = 0
        self.parts: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        skipped = (tag in SKIP_TAGS or bool(SKIP_CLASSES & set(a.get("class", "").split()))
                   or a.get("role", "") in SKIP_ROLES)
        if tag in BLOCK_TAGS and not self.skip:
            self.parts.append("\n")
        if tag in VOID_TAGS:
            return
        self.stack.append((tag, skipped))
        self.skip += skipped
        self.pre += tag == "pre"

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID_TAGS or all(t != tag for t, _ in self.stack):
            return  # stray end tag: ignore
        while self.stack:  # close implicitly closed elements (<p>, <li>) up to the match
            t, skipped = self.stack.pop()
            self.skip -= skipped
            self.pre -= t == "pre"
            if t == tag:
                break
        if tag in BLOCK_TAGS and not self.skip:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if self.skip:
            return
        self.parts.append(data if self.pre else re.sub(r"\s+", " ", data))


def html_to_text(markup: str) -> str:
    """Plain text of one HTML page: paragraphs separated by blank lines, ``pre`` kept as is."""
    p = _TextParser()
    p.feed(markup)
    p.close()
    lines = [ln.rstrip() for ln in "".join(p.parts).split("\n")]
    out: list[str] = []
    for ln in lines:
        if not ln.strip():
            if out and out[-1] != "":
                out.append("")
            continue
        out.append(ln if ln.startswith(" ") and len(ln) - len(ln.lstrip()) > 1 else ln.strip())
    return "\n".join(out).strip() + "\n"


def convert_tree(src: Path, dst: Path) -> tuple[int, int]:
    """Convert every ``*.html`` under ``src`` into ``dst/<relpath>.txt``; (written, skipped)."""
    written = skipped = 0
    for path in sorted(src.rglob("*.html")):
        rel = path.relative_to(src)
        if any(s in rel.name for s in SKIP_PAGES) or "_static" in rel.parts or not path.is_file():
            skipped += 1
            continue
        text = html_to_text(path.read_text(encoding="utf-8", errors="replace"))
        if len(text) < MIN_CHARS:
            skipped += 1
            continue
        out = dst / rel.with_suffix(".txt")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
        written += 1
    return written, skipped


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        sys.stderr.write("usage: html_text.py SRC_ROOT DST_ROOT\n")
        return 2
    src, dst = Path(argv[0]), Path(argv[1])
    if not src.is_dir():
        sys.stderr.write(f"html_text: {src} is not a folder\n")
        return 2
    written, skipped = convert_tree(src, dst)
    sys.stderr.write(f"html_text: {written} documents written to {dst}, {skipped} pages skipped\n")
    return 0 if written else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
