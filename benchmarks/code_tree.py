"""Git tree ids of the project's code folders, computed from the files alone (no ``.git`` needed).

The GPU host gets a copy of the working tree without a usable ``.git`` (once it answered
``git rev-parse`` with a stale commit), so the benchmarks and the GPU test record name the code
they ran by the same ids ``git rev-parse HEAD:kernels`` / ``HEAD:vllm_seer/backend`` give for a
clean checkout: the tree object hash of the folder's files, recomputed here. Ignored files
(``__pycache__``, ``*.pyc``, ``*.egg-info``) are left out, as git leaves them out of the tree;
other ignore rules (``.git/info/exclude``, global excludes) are not read, and a copy that changes
line endings or drops executable bits gives another id (neither happens to the GPU host's copy).
Command line: ``python benchmarks/code_tree.py [FOLDER ...]`` prints ``FOLDER TREE_ID`` lines.
"""

from __future__ import annotations

import hashlib
import os
import stat
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FOLDERS = {"kernels_tree": "kernels", "backend_tree": "vllm_seer/backend"}
IGNORED_DIRS = {"__pycache__", ".pytest_cache", ".ruff_cache"}
IGNORED_SUFFIXES = (".pyc", ".pyo", ".egg-info")


def _object(kind: str, data: bytes) -> bytes:
    return hashlib.sha1(f"{kind} {len(data)}\0".encode() + data).digest()


def tree_id(folder: Path) -> str | None:
    """Hex id of the git tree object of ``folder`` (``None`` if it holds no file git would keep)."""
    digest = _tree(folder)
    return digest.hex() if digest is not None else None


def _tree(folder: Path) -> bytes | None:
    entries = []
    for name in os.listdir(folder):
        path = folder / name
        if name in IGNORED_DIRS or name.endswith(IGNORED_SUFFIXES):
            continue
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            mode, digest = b"120000", _object("blob", os.readlink(path).encode())
        elif stat.S_ISDIR(st.st_mode):
            digest = _tree(path)
            if digest is None:  # git keeps no empty folder
                continue
            mode = b"40000"
        else:
            mode = b"100755" if st.st_mode & stat.S_IXUSR else b"100644"
            digest = _object("blob", path.read_bytes())
        # git sorts entries by name, a folder's name compared as if it ended with "/"
        raw = os.fsencode(name)
        key = raw + (b"/" if mode == b"40000" else b"")
        entries.append((key, mode + b" " + raw + b"\0" + digest))
    if not entries:
        return None
    return _object("tree", b"".join(e for _, e in sorted(entries)))


def code_trees(repo: Path = REPO) -> dict[str, str | None]:
    """``{"kernels_tree": ..., "backend_tree": ...}`` of the checkout at ``repo``."""
    return {key: tree_id(repo / rel) for key, rel in FOLDERS.items()}


if __name__ == "__main__":
    for rel in sys.argv[1:] or FOLDERS.values():
        print(rel, tree_id(REPO / rel))
