"""Shared parts of the fuzz targets (scripts/fuzz/fuzz_*.py, docs/reliability.md "Fuzzing").

Each target is an atheris (libFuzzer) script:

    .venv/bin/python scripts/fuzz/fuzz_gguf.py -runs=100000            # corpus: see below
    .venv/bin/python scripts/fuzz/fuzz_gguf.py -runs=1000 -seed=1 WORK_DIR SEED_DIR
    .venv/bin/python scripts/fuzz/fuzz_gguf.py --regressions            # replay the regression inputs
    .venv/bin/python scripts/fuzz/fuzz_state.py tests/fuzz_corpus/regressions/state-*   # replay files

Without corpus directories a target fuzzes from its seed corpus (``seed_dir``: tests/fuzz_corpus/<target>/,
committed, read-only; for the gguf target the generated micro models, below) and writes what it
finds to a work corpus under .cache/fuzz/<target>/ (libFuzzer writes new inputs into the first
directory it is given). A crash (a Python exception other than the documented errors, or a native
abort) writes crash-<sha1> into the current directory (-artifact_prefix=DIR/ elsewhere); copy it to
tests/fuzz_corpus/regressions/ as <target>-<what>.input -- unless it is a GGUF: no model file is
committed, so a GGUF finding becomes a named mutation of micro.tca.gguf in GGUF_MUTATIONS below.
tests/test_fuzz.py replays every regression input (``regression_inputs``).

The inputs are small: a one-layer, 16-wide llama ("micro", f16 weights, one head of 16, 260-token
byte-level vocabulary) of about 18 KB, with valid random tca.* budgets (block 16, window 32), written by
tca_ggml.random_model + gguf_meta.write_calibrated (``write_models``). They are not committed:
``ensure_models`` writes them on first use into .cache/fuzz/micro/ (git-ignored), byte for byte the
same each time, and checks their sha256 against MICRO_SHA256 (the state target's seeds were saved
from micro.tca.gguf, and save_state's envelope records that file's sha256: a different file would
make every state seed "another model"). That directory is the gguf target's seed corpus.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import struct
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "tests" / "fuzz_corpus"
WORK = REPO / ".cache" / "fuzz"
MODELS = WORK / "micro"              # the generated micro models (the gguf target's seed corpus)
GENERATED_REGRESSIONS = WORK / "regressions"   # the GGUF regression inputs, made from micro.tca.gguf
# the fixture the tokenizer target also uses (tca_ggml.models fetches it; tests/conftest.py too)
SMOL = "smollm2-135m"

# sha256 of the files write_models makes (the same bytes as the GGUF seeds committed until the
# GGUFs left git); tests/fuzz_corpus/state/*.input were saved from this micro.tca.gguf
MICRO_SHA256 = {
    "micro.gguf": "697153b8c38faa9a5ff36db51cf5f661127eacd7b633dbfc1f767a1e932f7ad6",
    "micro.tca.gguf": "d55a63c050d68802ee9cafb003a792c375a85ccd5cd740d49b884653a5cf6554",
}
# the tool string written into tca.calib.tool (gguf_meta's default is the installed version)
MICRO_CALIB_TOOL = "tca_ggml 0.1.0"


def micro_shape():
    from tca_ggml import random_model as rm
    return rm.ModelShape("micro", "llama", n_layer=1, n_embd=16, n_head=1, n_head_kv=1, n_ff=32, n_vocab=260,
                         rope_freq_base=10000.0, rms_eps=1e-5, n_ctx_train=512, tied_embeddings=True,
                         tokenizer_pre="llama-bpe", special_start=258, specials=((258, "<s>"), (259, "</s>")),
                         bos_id=258, eos_id=259)


def micro_budgets(seed: int = 1):
    from tca_ggml import gguf_meta as gm
    b = gm.make_random_budgets(1, 1, block_size=16, window=32, seed=seed, dense_fraction=0.0)
    b.calib_tool = MICRO_CALIB_TOOL    # not the installed version: the bytes must not change with it
    return b


def write_models(dir_: Path) -> dict:
    """Write the micro model without and with tca.* keys into dir_ (no check: ``ensure_models``)."""
    from tca_ggml import gguf_meta as gm, random_model as rm
    dir_ = Path(dir_)
    dir_.mkdir(parents=True, exist_ok=True)
    plain, tca = dir_ / "micro.gguf", dir_ / "micro.tca.gguf"
    rm.write_random_gguf(plain, micro_shape(), wtype="f16", seed=7)
    gm.write_calibrated(plain, tca, micro_budgets(), overwrite=True)
    return {"plain": str(plain), "tca": str(tca)}


def _sha256(path) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def _install(files: dict, dest: Path) -> None:
    """Move {name: path} into dest, each with one rename (a concurrent reader sees the old file or
    the new one, never half of one)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name, src in files.items():
        os.replace(src, dest / name)


def ensure_models(dir_: Path = MODELS) -> dict:
    """{"plain": path, "tca": path}: the micro models in dir_ (default .cache/fuzz/micro/), written
    there when missing or different, and checked against MICRO_SHA256. The gguf target's seeds; the
    model of the tokenize and state targets."""
    dir_ = Path(dir_)
    out = {"plain": dir_ / "micro.gguf", "tca": dir_ / "micro.tca.gguf"}
    if any(_sha256(p) != MICRO_SHA256[p.name] for p in out.values()):
        dir_.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".micro-", dir=dir_.parent))
        try:
            write_models(tmp)
            for name, want in MICRO_SHA256.items():
                got = _sha256(tmp / name)
                if got != want:
                    raise RuntimeError(
                        f"scripts/fuzz/common.py wrote {name} with sha256 {got}, expected {want}: the micro "
                        f"model is no longer made byte for byte as before (tca_ggml.random_model, gguf_meta "
                        f"or the gguf package changed). If that is intended, record the new sha256 in "
                        f"MICRO_SHA256 and remake the state seeds (fuzz_state.py --make-seeds) and the "
                        f"GGUF regression sha256s (GGUF_REGRESSION_SHA256)")
            _install({name: tmp / name for name in MICRO_SHA256}, dir_)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return {k: str(v) for k, v in out.items()}


# --------------------------------------------------------------------------------------------
# GGUF regression inputs: named mutations of micro.tca.gguf (no GGUF is committed)

_GGUF_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY, _GGUF_U32 = 8, 9, 4


def _gguf_kv_offsets(data: bytes) -> dict:
    """{key: (value type, offset of the value)} of a little-endian GGUF (v2/v3). Only for the
    well-formed micro models: no bounds checks beyond what struct does."""
    if data[:4] != b"GGUF":
        raise ValueError("not a GGUF file")
    (n_kv,) = struct.unpack_from("<Q", data, 16)

    def skip(off, t):
        if t in _GGUF_SCALAR:
            return off + _GGUF_SCALAR[t]
        if t == _GGUF_STRING:
            return off + 8 + struct.unpack_from("<Q", data, off)[0]
        if t == _GGUF_ARRAY:
            sub, n = struct.unpack_from("<IQ", data, off)
            off += 12
            for _ in range(n):
                off = skip(off, sub)
            return off
        raise ValueError(f"unknown GGUF value type {t}")

    out, off = {}, 24
    for _ in range(n_kv):
        (n,) = struct.unpack_from("<Q", data, off)
        key = data[off + 8:off + 8 + n].decode("utf-8")
        (t,) = struct.unpack_from("<I", data, off + 8 + n)
        off += 12 + n
        out[key] = (t, off)
        off = skip(off, t)
    return out


def _set_u32(data: bytes, key: str, value: int) -> bytes:
    """The GGUF bytes with the u32 value of `key` replaced (same length)."""
    t, at = _gguf_kv_offsets(data)[key]
    if t != _GGUF_U32:
        raise ValueError(f"{key} has type {t}, expected u32")
    b = bytearray(data)
    b[at:at + 4] = struct.pack("<I", value)
    return bytes(b)


def mutate_block_count_0(data: bytes) -> bytes:
    """llama.block_count (u32, 1) set to 0. Before issue 17 upstream's loader aborted on it
    (SIGABRT: GGML_ASSERT(n_layer_all > 0 && ... <= LLAMA_MAX_LAYERS)); now tca_gguf_check refuses
    it (ModelLoadError: invalid model metadata: llama.block_count)."""
    return _set_u32(data, "llama.block_count", 0)


def mutate_head_count_kv_huge(data: bytes) -> bytes:
    """llama.attention.head_count_kv (u32, 1) set to 0x20000001: found by the gguf target (session 15,
    one byte of micro.gguf). Before, Llama(..., tca=True) sized the K/V cache from it and reached
    ~21 GB (libFuzzer: out of memory) before failing; now tca_gguf_check refuses it (ModelLoadError:
    invalid model metadata: llama.attention.head_count_kv)."""
    return _set_u32(data, "llama.attention.head_count_kv", 0x20000001)


def mutate_duplicate_token(data: bytes, token: int = 98, copy_of: int = 97) -> bytes:
    """tokenizer.ggml.tokens[98] ("b") overwritten by token 97's string ("a"), same length, so the
    vocabulary holds "a" twice. Before issue 17 upstream's loader aborted on it (SIGABRT:
    GGML_ASSERT(id_to_token.size() == token_to_id.size())); now tca_gguf_check refuses it
    (ModelLoadError: tokenizer.ggml.tokens: token 98 duplicates token 97)."""
    t, at = _gguf_kv_offsets(data)["tokenizer.ggml.tokens"]
    sub, n = struct.unpack_from("<IQ", data, at)
    if t != _GGUF_ARRAY or sub != _GGUF_STRING or n <= max(token, copy_of):
        raise ValueError("tokenizer.ggml.tokens is not a string array holding both tokens")
    spans, off = [], at + 12
    for _ in range(max(token, copy_of) + 1):
        (ln,) = struct.unpack_from("<Q", data, off)
        spans.append((off + 8, off + 8 + ln))
        off += 8 + ln
    (s0, e0), (s1, e1) = spans[token], spans[copy_of]
    if e0 - s0 != e1 - s1 or data[s0:e0] == data[s1:e1]:
        raise ValueError(f"tokens {token} and {copy_of} differ in length or are already equal")
    b = bytearray(data)
    b[s0:e0] = data[s1:e1]
    return bytes(b)


def mutate_tool_embedded_nul(data: bytes) -> bytes:
    """tca.calib.tool's string (same length) made b"t\\0\\x80" + the rest: found by the gguf target
    (session 16). The native budget reader saw "t" (llama.cpp hands GGUF strings out as C strings),
    the Python reader the whole bytes -- invalid UTF-8 -- so one took the file and the other refused
    it (the target's check that both readers agree). Now Python reads up to the first NUL too."""
    t, at = _gguf_kv_offsets(data)["tca.calib.tool"]
    (n,) = struct.unpack_from("<Q", data, at)
    if t != _GGUF_STRING or n < 3:
        raise ValueError("tca.calib.tool is not a string of 3 bytes or more")
    b = bytearray(data)
    b[at + 9:at + 11] = b"\x00\x80"
    return bytes(b)


# file name -> mutation of micro.tca.gguf's bytes (the target is the name's prefix: gguf)
GGUF_MUTATIONS = {
    "gguf-block-count-0.gguf": mutate_block_count_0,
    "gguf-duplicate-token.gguf": mutate_duplicate_token,
    "gguf-head-count-kv-huge.gguf": mutate_head_count_kv_huge,
    "gguf-tool-embedded-nul.gguf": mutate_tool_embedded_nul,
}
# sha256 of each mutated file: the exact inputs that crashed (once committed as files of these names)
GGUF_REGRESSION_SHA256 = {
    "gguf-block-count-0.gguf": "e61edc87032b1cdeb821a6587fdc29b549cca1bb980cecfe6ec9163375a62b71",
    "gguf-duplicate-token.gguf": "be99e645ee8d6f77af03e6917d7e05eba16f927ad155e8f7446d05a1310b9249",
    "gguf-head-count-kv-huge.gguf": "9cdbd396b9ff57340e53aaefcc2ec40b8f290f81d233b7c36c6ed3999139da38",
    "gguf-tool-embedded-nul.gguf": "5da02c150f6f9ab2f4b877d24971bcd892a8f5fd6ad9597b5afaef209fcec0ea",
}


def write_gguf_regressions(dir_: Path = GENERATED_REGRESSIONS) -> list:
    """Write each GGUF_MUTATIONS input into dir_ (default .cache/fuzz/regressions/, git-ignored)
    from the checked micro.tca.gguf, check its sha256, and return the paths (sorted)."""
    dir_ = Path(dir_)
    base = Path(ensure_models()["tca"]).read_bytes()
    dir_.mkdir(parents=True, exist_ok=True)
    out = []
    for name, mutate in sorted(GGUF_MUTATIONS.items()):
        data = mutate(base)
        got = hashlib.sha256(data).hexdigest()
        if got != GGUF_REGRESSION_SHA256[name]:
            raise RuntimeError(f"the mutation {name} ({mutate.__name__}) gave sha256 {got}, expected "
                               f"{GGUF_REGRESSION_SHA256[name]}: it no longer makes the input that crashed")
        path = dir_ / name
        if _sha256(path) != got:
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=dir_)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        out.append(path)
    return out


def regression_inputs(target: str) -> list:
    """Every regression input of a target: its committed files tests/fuzz_corpus/regressions/<target>-*
    and, for the gguf target, the generated mutations (write_gguf_regressions)."""
    files = sorted(p for p in (CORPUS / "regressions").glob(target + "-*") if p.is_file())
    if target == "gguf":
        files += write_gguf_regressions()
    return files


def seed_dir(target: str) -> Path:
    """The seed corpus of a target: tests/fuzz_corpus/<target>/, or for gguf the directory of the
    generated micro models (ensure_models)."""
    if target == "gguf":
        return Path(ensure_models()["tca"]).parent
    return CORPUS / target


def corpus_args(target: str, argv: list) -> list:
    """argv with the default corpus directories appended when none is given (a positional
    argument that is a directory), and with the tca_ggml/atheris banner flags left as they are.
    ``--regressions`` is replaced by the target's regression inputs (replayed once each)."""
    if "--regressions" in argv:
        argv = [a for a in argv if a != "--regressions"] + [str(p) for p in regression_inputs(target)]
    positional = [a for a in argv[1:] if not a.startswith("-")]
    if positional:
        return argv
    work = WORK / target
    work.mkdir(parents=True, exist_ok=True)
    seeds = seed_dir(target)
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
        print(ensure_models())
    elif sys.argv[1:] == ["--write-regressions"]:
        print("\n".join(str(p) for p in write_gguf_regressions()))
    else:
        raise SystemExit("usage: python scripts/fuzz/common.py --write-models | --write-regressions\n"
                         "  (.cache/fuzz/micro/: the micro models, sha256-checked; .cache/fuzz/regressions/: "
                         "the GGUF regression inputs)")
