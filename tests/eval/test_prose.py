"""The prose corpus: HTML → text conversion, ``prose_root`` and the suite's held-out windows."""

from pathlib import Path

import pytest

from vllm_seer.eval.html_text import convert_tree, html_to_text
from vllm_seer.eval.suite import corpus_windows
from vllm_seer.train.data import list_documents, prose_root, split_of

PAGE = """<!DOCTYPE html><html><head><title>T</title><script>var x = 1;</script>
<style>p {color: red}</style></head><body>
<nav role="navigation"><a href="a.html">Previous page</a></nav>
<div class="sphinxsidebar">Table of contents</div>
<div class="body" role="main"><h1>The os module<a class="headerlink" href="#x">¶</a></h1>
<p>This module provides a <em>portable</em>
   way of using operating system functionality.<p>Second paragraph &amp; more.
<pre>def f(x):
    return x + 1
</pre><ul><li>one</li><li>two</li></ul></div>
<div class="footer">Copyright 2001</div></body></html>"""


def test_html_to_text_keeps_body_text_and_drops_chrome() -> None:
    text = html_to_text(PAGE)
    assert text.startswith("The os module\n")
    assert "This module provides a portable way of using operating system functionality." in text
    assert "Second paragraph & more." in text
    assert "def f(x):\n    return x + 1" in text  # pre kept verbatim
    assert "one\ntwo" in text.replace("\n\n", "\n")
    for gone in ("var x", "color: red", "Previous page", "Table of contents", "¶", "Copyright"):
        assert gone not in text


def test_convert_tree_writes_one_text_per_page(tmp_path: Path) -> None:
    src = tmp_path / "root" / "usr" / "share" / "doc" / "pkg"
    (src / "library").mkdir(parents=True)
    long_body = "<p>" + "Prose sentence number one. " * 100 + "</p>"
    (src / "library" / "os.html").write_text(f"<html><body>{long_body}</body></html>")
    (src / "genindex.html").write_text(f"<html><body>{long_body}</body></html>")  # index page
    (src / "short.html").write_text("<html><body><p>tiny</p></body></html>")
    written, skipped = convert_tree(tmp_path / "root", tmp_path / "text")
    assert (written, skipped) == (1, 2)
    out = tmp_path / "text" / "usr" / "share" / "doc" / "pkg" / "library" / "os.txt"
    assert out.read_text().startswith("Prose sentence number one.")


def test_prose_root_error_names_the_script(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_SEER_PROSE", str(tmp_path / "nothing"))
    with pytest.raises(FileNotFoundError, match="scripts/get-prose.sh"):
        prose_root()
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "a.txt").write_text("x")
    monkeypatch.setenv("VLLM_SEER_PROSE", str(tmp_path / "t"))
    assert prose_root() == tmp_path / "t"


def test_fetched_prose_has_heldout_documents() -> None:
    """scripts/setup.sh fetched the corpus (make test needs it); the split is by document."""
    root = prose_root()
    held = list_documents("heldout", root=root, suffixes=(".txt",))
    train = list_documents("train", root=root, suffixes=(".txt",))
    assert len(held) >= 50 and len(train) >= 500
    assert all(split_of(d.name) == "heldout" for d in held)
    assert not {d.name for d in held} & {d.name for d in train}


class _CharTokenizer:
    """One token per character (enough to test the windowing)."""

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) % 256 for c in text]}


def test_corpus_windows_round_robin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    names = [f"d{i}.txt" for i in range(40)]
    held = [n for n in names if split_of(n) == "heldout"]
    assert len(held) >= 2, held
    for i, n in enumerate(names):
        (tmp_path / n).write_text(chr(65 + i % 26) * (300 * (i + 1)))
    monkeypatch.setenv("VLLM_SEER_PROSE", str(tmp_path))
    got = corpus_windows(_CharTokenizer(), "prose", 100, 2 * len(held) + 1)
    ids = [w for w, _ in got]
    # every held-out document's first window before any second window; no duplicates
    assert [i.split("#")[1] for i in ids[:len(held)]] == ["0"] * len(held)
    assert len(set(ids)) == len(ids) and all(t.shape == (100,) for _, t in got)
    assert {i.split("#")[0] for i in ids} <= set(held)
