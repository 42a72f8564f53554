#!/usr/bin/env python3
"""Fuzz target: tokenize / detokenize on the SmolLM2 fixture and on the micro model.

Each input picks a model and flags from its first bytes, then either tokenizes the rest as text
(and detokenizes the tokens) or detokenizes the rest read as token ids (in range and out of it,
with and without prev_tokens). Seeds: tests/fuzz_corpus/tokenize/.
Allowed outcomes: results, or TokenizeError (an out-of-range id, text upstream cannot tokenize).
Findings: any other exception, a native abort (the code point above U+10FFFF was one), a hang,
a token id out of [0, n_vocab), an in-range id that does not detokenize, and -- on the micro
model, whose byte-level vocabulary has every byte -- valid UTF-8 text that does not come back
byte for byte. (SmolLM2's vocabulary lacks some byte tokens: upstream drops those bytes, so no
round trip is asserted there.)

    .venv/bin/python scripts/fuzz/fuzz_tokenize.py -runs=100000 [-seed=N] [CORPUS_DIR ...]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import atheris  # noqa: E402

with atheris.instrument_imports(include=["tca_ggml"]):
    from tca_ggml import Llama, models
    from tca_ggml.errors import TokenizeError

LLMS = []


class Finding(Exception):
    """A property of the harness does not hold (not an exception of the library)."""


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    which = fdp.ConsumeIntInRange(0, len(LLMS) - 1)
    llm, round_trip = LLMS[which]
    n_vocab = llm.n_vocab()
    flags = fdp.ConsumeIntInRange(0, 15)
    add_bos, special, detok_special, ids_mode = (bool(flags & 1), bool(flags & 2), bool(flags & 4), bool(flags & 8))
    if not ids_mode:
        text = fdp.ConsumeBytes(fdp.remaining_bytes())
        try:
            toks = llm.tokenize(text, add_bos=add_bos, special=special)
        except TokenizeError:
            return
        if any(not (0 <= t < n_vocab) for t in toks):
            raise Finding(f"token id out of range in {toks}")
        back = llm.detokenize(toks, special=detok_special)
        if round_trip and not add_bos and not special and not detok_special:
            try:
                text.decode("utf-8")
            except UnicodeDecodeError:
                return
            if back != text:
                raise Finding(f"round trip: {text!r} -> {toks} -> {back!r}")
        return
    n_prev = fdp.ConsumeIntInRange(0, 4)
    ids = fdp.ConsumeIntListInRange(fdp.remaining_bytes() // 2, -3, n_vocab + 3)
    prev, ids = ids[:n_prev], ids[n_prev:]
    in_range = all(0 <= t < n_vocab for t in prev + ids)
    try:
        out = llm.detokenize(ids, prev_tokens=prev or None, special=detok_special)
    except TokenizeError:
        if in_range:
            raise
        return
    if not in_range:
        raise Finding(f"out-of-range ids detokenized: {prev} {ids}")
    if not isinstance(out, bytes):
        raise Finding(f"detokenize returned {type(out).__name__}")


def main():
    micro = common.ensure_models()["tca"]
    smol = str(models.fetch(common.SMOL, quiet=True))
    LLMS.append((Llama(smol, vocab_only=True, verbose=False), False))
    LLMS.append((Llama(micro, vocab_only=True, verbose=False), True))
    common.fuzz("tokenize", sys.argv, one_input)


if __name__ == "__main__":
    main()
