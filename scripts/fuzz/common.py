"""Shared parts of the fuzz targets (scripts/fuzz/fuzz_*.py, docs/reliability.md "Fuzzing").

Each target is an atheris (libFuzzer) script:

    .venv/bin/python scripts/fuzz/fuzz_gguf.py -runs=100000            # corpus: see below
    .venv/bin/python scripts/fuzz/fuzz_gguf.py -runs=1000 -seed=1 WORK_DIR SEED_DIR
    .venv/bin/python scripts/fuzz/fuzz_gguf.py tests/fuzz_corpus/regressions/gguf-*   # replay files

Without corpus directories a target fuzzes from its seed corpus tests/fuzz_corpus/<target>/
(committed, read-only) and writes what it finds to a work corpus under .cache/fuzz/<target>/
(libFuzzer writes new inputs into the first directory it is given). A crash (a Python exception
other than the documented errors, or a native abort) writes crash-<sha1> into the current
directory (-artifact_prefix=DIR/ elsewhere); copy it to tests/fuzz_corpus/regressions/ as
<target>-<what>.bin: tests/test_fuzz.py replays every regression file.

The inputs are small: a one-layer, 16-wide llama ("micro", f16 weights, one head of 16, 260-token
byte-level vocabulary) of about 18 KB, with valid random tca.* budgets (block 16, window 32), written by
tca_ggml.random_model + gguf_meta.write_calibrated (``write_models``; committed as the GGUF seeds
tests/fuzz_corpus/gguf/micro.gguf and micro.tca.gguf, which the other targets load).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "tests" / "fuzz_corpus"
WORK = REPO / ".cache" / "fuzz"
# the fixture the tokenizer target also uses (tca_ggml.models fetches it; tests/conftest.py too)
SMOL = "smollm2-135m"


def micro_shape():
    from tca_ggml import random_model as rm
    return rm.ModelShape("micro", "llama", n_layer=1, n_embd=16, n_head=1, n_head_kv=1, n_ff=32, n_vocab=260,
                         rope_freq_base=10000.0, rms_eps=1e-5, n_ctx_train=512, tied_embeddings=True,
                         tokenizer_pre="llama-bpe", special_start=258, specials=((258, "<s>"), (259, "</s>")),
                         bos_id=258, eos_id=259)


def micro_budgets(seed: int = 1):
    from tca_ggml import gguf_meta as gm
    return gm.make_random_budgets(1, 1, block_size=16, window=32, seed=seed, dense_fraction=0.0)


def write_models(dir_: Path) -> dict:
    """Write the micro model without and with tca.* keys into dir_ (how the committed seeds
    tests/fuzz_corpus/gguf/micro*.gguf were made)."""
    from tca_ggml import gguf_meta as gm, random_model as rm
    dir_.mkdir(parents=True, exist_ok=True)
    plain, tca = dir_ / "micro.gguf", dir_ / "micro.tca.gguf"
    rm.write_random_gguf(plain, micro_shape(), wtype="f16", seed=7)
    gm.write_calibrated(plain, tca, micro_budgets(), overwrite=True)
    return {"plain": str(plain), "tca": str(tca)}


def ensure_models() -> dict:
    """{"plain": path, "tca": path}: the committed micro models (the GGUF target's seeds; the
    state target's seeds were saved from micro.tca.gguf, whose sha256 their envelope records)."""
    d = CORPUS / "gguf"
    out = {"plain": str(d / "micro.gguf"), "tca": str(d / "micro.tca.gguf")}
    if not all(os.path.isfile(p) for p in out.values()):
        raise SystemExit(f"the micro models are missing from {d}: python scripts/fuzz/common.py --write-models")
    return out


def corpus_args(target: str, argv: list) -> list:
    """argv with the default corpus directories appended when none is given (a positional
    argument that is a directory), and with the tca_ggml/atheris banner flags left as they are."""
    positional = [a for a in argv[1:] if not a.startswith("-")]
    if positional:
        return argv
    work = WORK / target
    work.mkdir(parents=True, exist_ok=True)
    seeds = CORPUS / target
    return argv + [str(work)] + ([str(seeds)] if seeds.is_dir() else [])


def fuzz(target: str, argv: list, one_input, custom_mutator=None) -> None:
    """Run a target: its corpus directories (corpus_args), a 30 s per-input timeout unless argv
    sets one, and atheris/libFuzzer over one_input (with custom_mutator when given)."""
    import atheris
    argv = corpus_args(target, argv)
    if not any(a.startswith("-timeout=") for a in argv):
        argv.insert(1, "-timeout=30")
    if custom_mutator is None:
        atheris.Setup(argv, one_input)
    else:
        atheris.Setup(argv, one_input, custom_mutator=custom_mutator)
    atheris.Fuzz()


def scratch_path(name: str) -> str:
    """A path for the input file of one execution: in memory (/dev/shm) when possible."""
    base = Path("/dev/shm") if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else WORK
    d = base / f"tca_fuzz_{os.getpid()}"
    d.mkdir(parents=True, exist_ok=True)
    return str(d / name)


def quiet_native() -> None:
    """Nothing from upstream's log on stderr (the Llama instances are verbose=False; the gguf
    reader of ggml logs through the same callback once the library is loaded)."""
    from tca_ggml import _native
    _native.lib()


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-models"]:
        print(write_models(CORPUS / "gguf"))
    else:
        raise SystemExit("usage: python scripts/fuzz/common.py --write-models")
