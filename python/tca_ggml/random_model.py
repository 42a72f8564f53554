"""Random-weight GGUF files of real model shapes, for benchmarks (no download).

    python -m tca_ggml.random_model --shape llama-3.1-8b --wtype q8_0 -o llama8b.gguf [--seed N]
    python -m tca_ggml.random_model --list

The files load in llama.cpp like the real models of that shape: same architecture, metadata,
tensor names/shapes/types and vocabulary size (a synthetic byte-level BPE vocabulary: the 256
byte tokens, one merge, filler tokens and the model's special tokens at their real ids; text
tokenizes to about one token per byte). Weights are random, so the text is gibberish, but
every matmul, the KV cache and attention cost what they cost in the real model.

Fast and with bounded memory: one pool of random values (a few tens of MB) is drawn once and
each tensor is written as a window (at a random offset, wrapping) of that pool, prepared once
per distinct scale. Q8_0 blocks (f16 scale + 32 int8) are built directly as bytes, never
quantized element by element: the 8B shape (8.5 GB at Q8_0) is disk-bound. The header
(metadata, tensor infos) is written by `gguf.GGUFWriter`; the tensor data is streamed after it
(the lent GPU machine gets `gguf` from the carried wheels, scripts/gpu/make_devcarry.sh).
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT, LlamaFileType

from ._fsutil import replace_when_done

# --------------------------------------------------------------------------------------------
# shapes (values from the models' published config.json)


@dataclass(frozen=True)
class ModelShape:
    name: str
    arch: str                   # GGUF general.architecture
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_vocab: int
    rope_freq_base: float
    rms_eps: float
    n_ctx_train: int
    tied_embeddings: bool = False   # no output.weight: llama.cpp reuses token_embd.weight
    qkv_bias: bool = False          # attn_q/k/v.bias (qwen2)
    # llama3-style rope scaling -> a rope_freqs.weight tensor, as convert_hf_to_gguf.py writes
    # it: (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings)
    rope_llama3: Optional[Tuple[float, float, float, int]] = None
    tokenizer_pre: str = "llama-bpe"
    special_start: int = 0          # ids [special_start, n_vocab) are control tokens
    specials: Tuple[Tuple[int, str], ...] = ()
    bos_id: int = 0
    eos_id: int = 0
    add_bos: bool = True

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def n_embd_q(self) -> int:
        return self.n_head * self.head_dim

    @property
    def n_embd_kv(self) -> int:
        return self.n_head_kv * self.head_dim


_LLAMA3_SPECIALS = ((128000, "<|begin_of_text|>"), (128001, "<|end_of_text|>"),
                    (128006, "<|start_header_id|>"), (128007, "<|end_header_id|>"),
                    (128008, "<|eom_id|>"), (128009, "<|eot_id|>"))
_QWEN2_SPECIALS = ((151643, "<|endoftext|>"), (151644, "<|im_start|>"), (151645, "<|im_end|>"))

SHAPES: Dict[str, ModelShape] = {s.name: s for s in (
    # meta-llama/Llama-3.1-8B
    ModelShape("llama-3.1-8b", "llama", n_layer=32, n_embd=4096, n_head=32, n_head_kv=8, n_ff=14336,
               n_vocab=128256, rope_freq_base=500000.0, rms_eps=1e-5, n_ctx_train=131072,
               rope_llama3=(8.0, 1.0, 4.0, 8192), tokenizer_pre="llama-bpe", special_start=128000,
               specials=_LLAMA3_SPECIALS, bos_id=128000, eos_id=128001),
    # meta-llama/Llama-3.2-1B
    ModelShape("llama-3.2-1b", "llama", n_layer=16, n_embd=2048, n_head=32, n_head_kv=8, n_ff=8192,
               n_vocab=128256, rope_freq_base=500000.0, rms_eps=1e-5, n_ctx_train=131072,
               tied_embeddings=True, rope_llama3=(32.0, 1.0, 4.0, 8192), tokenizer_pre="llama-bpe",
               special_start=128000, specials=_LLAMA3_SPECIALS, bos_id=128000, eos_id=128001),
    # Qwen/Qwen2.5-0.5B
    ModelShape("qwen2.5-0.5b", "qwen2", n_layer=24, n_embd=896, n_head=14, n_head_kv=2, n_ff=4864,
               n_vocab=151936, rope_freq_base=1000000.0, rms_eps=1e-6, n_ctx_train=32768,
               tied_embeddings=True, qkv_bias=True, tokenizer_pre="qwen2", special_start=151643,
               specials=_QWEN2_SPECIALS, bos_id=151643, eos_id=151643, add_bos=False),
    # for tests: a 2-layer llama of the same structure (GQA 2:1, head_dim 32)
    ModelShape("tiny", "llama", n_layer=2, n_embd=128, n_head=4, n_head_kv=2, n_ff=256, n_vocab=512,
               rope_freq_base=10000.0, rms_eps=1e-5, n_ctx_train=8192, tokenizer_pre="llama-bpe",
               special_start=510, specials=((510, "<|begin_of_text|>"), (511, "<|end_of_text|>")),
               bos_id=510, eos_id=511),
)}

WTYPES = ("q8_0", "f16", "f32")

# ggml type ids, their block sizes and llama_ftype ids: gguf-py's tables (ggml.h / llama.h)
_WTYPE_GGML = {"q8_0": int(QT.Q8_0), "f16": int(QT.F16), "f32": int(QT.F32)}
_WTYPE_FTYPE = {"q8_0": LlamaFileType.MOSTLY_Q8_0, "f16": LlamaFileType.MOSTLY_F16, "f32": LlamaFileType.ALL_F32}
QK8_0, _Q8_BLOCK = GGML_QUANT_SIZES[QT.Q8_0]  # 32 values a block: f16 d + 32 x int8 = 34 bytes

# scale of the random matrices: N(0, gain^2 / fan_in). Pre-norm blocks see RMS-1 inputs; the
# projections back into the residual stream get gain 0.5 so the stream grows ~sqrt(n_layer)/2
# and logits stay O(1) (tied or not: token_embd has std 1/sqrt(n_embd)).
_GAIN_IN, _GAIN_OUT = 1.0, 0.5
_BIAS_STD = 0.02

# the random pool: _POOL_BLOCKS blocks of 32 values (2^19 - 1, a prime, so that windows of
# different tensors/rows do not line up). 16.8 M values: int8 16 MB, Q8_0 17 MB, f16 32 MB,
# f32 64 MB per distinct scale (3 to 5 scales per model).
_POOL_BLOCKS = (1 << 19) - 1
_Q_STD = 30.0  # std of the int8 quants (clipped at +-127, ~4.2 sigma)


def get_shape(shape: Union[str, ModelShape]) -> ModelShape:
    if isinstance(shape, ModelShape):
        return shape
    s = SHAPES.get(shape)
    if s is None:
        raise ValueError(f"unknown model shape {shape!r} (known: {', '.join(SHAPES)})")
    return s


# --------------------------------------------------------------------------------------------
# tensor plan


@dataclass(frozen=True)
class TensorSpec:
    name: str
    ne: Tuple[int, ...]      # ggml order (ne0 = row length), as llama.cpp's create_tensor dims
    ggml_type: int           # gguf.GGMLQuantizationType value: 0 f32, 1 f16, 8 q8_0
    nbytes: int
    kind: str                # "random" (std) | "ones" | "bias" | "rope_freqs"
    std: float = 0.0

    @property
    def type_name(self) -> str:
        return QT(self.ggml_type).name.lower()


def _nbytes(ne: Sequence[int], ggml_type: int) -> int:
    n = int(np.prod(ne))
    blk, size = GGML_QUANT_SIZES[QT(ggml_type)]
    if ne[0] % blk:
        raise ValueError(f"row length {ne[0]} is not a multiple of {blk} (needed for {QT(ggml_type).name.lower()})")
    return n // blk * size


def tensor_plan(shape: Union[str, ModelShape], wtype: str = "q8_0",
                n_layer: Optional[int] = None) -> List[TensorSpec]:
    """The tensors of the file, in file order, without writing anything."""
    s = get_shape(shape)
    if wtype not in _WTYPE_GGML:
        raise ValueError(f"unknown weight type {wtype!r} (known: {', '.join(WTYPES)})")
    L = s.n_layer if n_layer is None else int(n_layer)
    if L < 1:
        raise ValueError(f"n_layer must be >= 1, got {L}")
    wt = _WTYPE_GGML[wtype]
    out: List[TensorSpec] = []

    def mat(name, ne0, ne1, std):
        ne = (ne0, ne1)
        out.append(TensorSpec(name, ne, wt, _nbytes(ne, wt), "random", std))

    def vec(name, n, kind, std=0.0):
        out.append(TensorSpec(name, (n,), int(QT.F32), 4 * n, kind, std))

    E, F = s.n_embd, s.n_ff
    mat("token_embd.weight", E, s.n_vocab, 1.0 / math.sqrt(E))
    if s.rope_llama3 is not None:
        vec("rope_freqs.weight", s.head_dim // 2, "rope_freqs")
    for i in range(L):
        p = f"blk.{i}."
        vec(p + "attn_norm.weight", E, "ones")
        mat(p + "attn_q.weight", E, s.n_embd_q, _GAIN_IN / math.sqrt(E))
        mat(p + "attn_k.weight", E, s.n_embd_kv, _GAIN_IN / math.sqrt(E))
        mat(p + "attn_v.weight", E, s.n_embd_kv, _GAIN_IN / math.sqrt(E))
        if s.qkv_bias:
            vec(p + "attn_q.bias", s.n_embd_q, "bias", _BIAS_STD)
            vec(p + "attn_k.bias", s.n_embd_kv, "bias", _BIAS_STD)
            vec(p + "attn_v.bias", s.n_embd_kv, "bias", _BIAS_STD)
        mat(p + "attn_output.weight", s.n_embd_q, E, _GAIN_OUT / math.sqrt(s.n_embd_q))
        vec(p + "ffn_norm.weight", E, "ones")
        mat(p + "ffn_gate.weight", E, F, _GAIN_IN / math.sqrt(E))
        mat(p + "ffn_up.weight", E, F, _GAIN_IN / math.sqrt(E))
        mat(p + "ffn_down.weight", F, E, _GAIN_OUT / math.sqrt(F))
    vec("output_norm.weight", E, "ones")
    if not s.tied_embeddings:
        mat("output.weight", E, s.n_vocab, 1.0 / math.sqrt(E))
    return out


def file_size_estimate(shape: Union[str, ModelShape], wtype: str = "q8_0", n_layer: Optional[int] = None) -> int:
    """Bytes of tensor data (the header adds a few MB: the vocabulary)."""
    return sum(-(-t.nbytes // 32) * 32 for t in tensor_plan(shape, wtype, n_layer))


# --------------------------------------------------------------------------------------------
# vocabulary


def _bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's byte -> printable character map (what byte-level BPE token texts are made of)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def synthetic_vocab(shape: Union[str, ModelShape]):
    """(tokens, token_types, merges): ids 0..255 the byte tokens, 256 "ĠĠ" (the one merge),
    filler tokens up to special_start, then control tokens (the shape's specials at their real
    ids, "<|reserved_special_token_K|>" elsewhere)."""
    s = get_shape(shape)
    if not 258 <= s.special_start <= s.n_vocab:
        raise ValueError(f"{s.name}: special_start {s.special_start} must be in [258, n_vocab]")
    b2u = _bytes_to_unicode()
    tokens = [b2u[b] for b in range(256)]
    sp = b2u[ord(" ")]
    tokens.append(sp + sp)
    tokens.extend(f"{sp}t{i}" for i in range(len(tokens), s.special_start))
    named = dict(s.specials)
    k = 0
    for i in range(s.special_start, s.n_vocab):
        if i in named:
            tokens.append(named[i])
        else:
            tokens.append(f"<|reserved_special_token_{k}|>")
            k += 1
    types = [1] * s.special_start + [3] * (s.n_vocab - s.special_start)  # NORMAL / CONTROL
    assert len(tokens) == s.n_vocab and len(set(tokens)) == s.n_vocab
    return tokens, types, [f"{sp} {sp}"]


def _rope_llama3_factors(s: ModelShape) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.generate_extra_tensors (rope_type llama3)."""
    factor, low, high, old_ctx = s.rope_llama3
    dim = s.head_dim
    freqs = 1.0 / (s.rope_freq_base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    low_wl, high_wl = old_ctx / low, old_ctx / high
    out = []
    for f in freqs:
        wl = 2 * math.pi / float(f)
        if wl < high_wl:
            out.append(1.0)
        elif wl > low_wl:
            out.append(factor)
        else:
            smooth = (old_ctx / wl - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


# --------------------------------------------------------------------------------------------
# writing


class _Pools:
    """Ready-to-write byte pools, one per distinct std, all windows of one random draw."""

    def __init__(self, rng: np.random.Generator, wtype: str, n_blocks: int = _POOL_BLOCKS):
        self.wtype = wtype
        self.n_blocks = n_blocks = max(1, min(int(n_blocks), _POOL_BLOCKS))
        self.unit = {"q8_0": _Q8_BLOCK, "f16": 2, "f32": 4}[wtype]   # bytes per pool unit
        self.n_units = n_blocks if wtype == "q8_0" else n_blocks * QK8_0
        normal = rng.standard_normal(n_blocks * QK8_0, dtype=np.float32)
        if wtype == "q8_0":
            self._q = np.clip(np.rint(normal * _Q_STD), -127, 127).astype(np.int8).reshape(n_blocks, QK8_0)
            self._q_std = float(self._q.std(dtype=np.float64))
        else:
            self._normal = normal
        self._cache: Dict[float, memoryview] = {}

    def get(self, std: float) -> memoryview:
        mv = self._cache.get(std)
        if mv is None:
            if self.wtype == "q8_0":
                blk = np.empty(self.n_blocks, dtype=[("d", "<f2"), ("qs", "i1", (QK8_0,))])
                assert blk.dtype.itemsize == _Q8_BLOCK
                blk["d"] = np.float16(std / self._q_std)
                blk["qs"] = self._q
                arr = blk
            else:
                arr = (self._normal * np.float32(std)).astype("<f2" if self.wtype == "f16" else "<f4")
            mv = memoryview(arr.view(np.uint8).reshape(-1))
            self._cache[std] = mv
        return mv


_GGUF_ALIGNMENT = 32  # gguf.GGUFWriter's default (general.alignment is not written)


def _gguf_writer(path: str, s: ModelShape, wtype: str, L: int, n_ctx: int, plan: List[TensorSpec],
                 budgets=None):
    """A gguf.GGUFWriter holding the model's metadata and tensor infos (the data is streamed by
    the caller after ``write_ti_data_to_file``)."""
    from gguf import GGUFValueType as VT, GGUFWriter
    a = s.arch
    w = GGUFWriter(path, a)                                   # general.architecture first
    w.add_string("general.name", f"random {s.name}")
    w.add_uint32("general.file_type", _WTYPE_FTYPE[wtype])
    if wtype == "q8_0":
        w.add_uint32("general.quantization_version", 2)
    w.add_uint32(f"{a}.vocab_size", s.n_vocab)
    w.add_uint32(f"{a}.block_count", L)
    w.add_uint32(f"{a}.context_length", n_ctx)
    w.add_uint32(f"{a}.embedding_length", s.n_embd)
    w.add_uint32(f"{a}.feed_forward_length", s.n_ff)
    w.add_uint32(f"{a}.attention.head_count", s.n_head)
    w.add_uint32(f"{a}.attention.head_count_kv", s.n_head_kv)
    w.add_float32(f"{a}.rope.freq_base", s.rope_freq_base)
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", s.rms_eps)
    w.add_uint32(f"{a}.rope.dimension_count", s.head_dim)
    tokens, types, merges = synthetic_vocab(s)
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", s.tokenizer_pre)
    w.add_key_value("tokenizer.ggml.tokens", tokens, VT.ARRAY, VT.STRING)
    w.add_key_value("tokenizer.ggml.token_type", types, VT.ARRAY, VT.INT32)
    w.add_key_value("tokenizer.ggml.merges", merges, VT.ARRAY, VT.STRING)
    w.add_uint32("tokenizer.ggml.bos_token_id", s.bos_id)
    w.add_uint32("tokenizer.ggml.eos_token_id", s.eos_id)
    w.add_bool("tokenizer.ggml.add_bos_token", s.add_bos)
    if budgets is not None:
        from . import gguf_meta
        gguf_meta.add_to_writer(w, budgets)
    for t in plan:   # GGUFWriter takes numpy-order shapes; the bytes are given, not computed
        w.add_tensor_info(t.name, tuple(reversed(t.ne)), np.float32, t.nbytes,
                          raw_dtype=QT(t.ggml_type))
    assert w.data_alignment == _GGUF_ALIGNMENT
    return w


def write_random_gguf(path: Union[str, os.PathLike], shape: Union[str, ModelShape], wtype: str = "q8_0",
                      seed: int = 0, n_ctx_train: Optional[int] = None, *, n_layer: Optional[int] = None,
                      random_budgets: bool = False, data: bool = True, overwrite: bool = True) -> dict:
    """Write a random-weight GGUF of `shape` (a name in SHAPES or a ModelShape) to `path`.

    wtype: "q8_0" | "f16" | "f32" for the 2-D weights (norms, biases, rope factors are f32).
    n_ctx_train overrides {arch}.context_length; n_layer overrides the number of blocks
    (e.g. a 2-layer "8B" to test loading quickly). random_budgets=True embeds valid random
    tca.* budgets (gguf_meta.make_random_budgets; needs the `gguf` package) so that tca=True
    runs the calibrated path. data=False leaves the weight data as a hole (a sparse file read
    back as zeros: loads, runs, logits all zero) -- for loader/shape tests only.

    The file is written to PATH.tmp and renamed when complete. Returns a dict with the path,
    n_tensors, bytes and seconds.
    """
    t0 = time.perf_counter()
    s = get_shape(shape)
    plan = tensor_plan(s, wtype, n_layer)
    L = s.n_layer if n_layer is None else int(n_layer)
    n_ctx = s.n_ctx_train if n_ctx_train is None else int(n_ctx_train)
    if n_ctx < 1:
        raise ValueError(f"n_ctx_train must be >= 1, got {n_ctx}")
    path = os.fspath(path)
    if not overwrite and os.path.exists(path):
        raise FileExistsError(f"{path} exists")
    need = file_size_estimate(s, wtype, n_layer) + (64 << 20)
    free = shutil.disk_usage(os.path.dirname(os.path.abspath(path)) or ".").free
    if data and free < need:
        raise OSError(f"not enough disk space for {path}: need ~{need / 2**30:.1f} GiB, "
                      f"{free / 2**30:.1f} GiB free")

    rng = np.random.default_rng(seed)
    budgets = None
    if random_budgets:
        from . import gguf_meta
        budgets = gguf_meta.make_random_budgets(L, s.n_head_kv, seed=seed)

    tmp = path + ".tmp"
    with replace_when_done(tmp, path):
        w = _gguf_writer(tmp, s, wtype, L, n_ctx, plan, budgets)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        fout = w.fout[0]
        try:
            fout.write(b"\0" * (-fout.tell() % _GGUF_ALIGNMENT))
            data_start = fout.tell()
            # a pool no larger than the data (small models), else _POOL_BLOCKS reused by windows
            n_rand = sum(int(np.prod(t.ne)) for t in plan if t.kind == "random")
            pools = _Pools(rng, wtype, -(-n_rand // QK8_0)) if data else None
            offset = 0
            for t in plan:
                if t.kind == "random":
                    if pools is not None:
                        mv, unit = pools.get(t.std), pools.unit
                        left = t.nbytes // unit
                        pos = int(rng.integers(pools.n_units))
                        while left:
                            n = min(left, pools.n_units - pos)
                            fout.write(mv[pos * unit:(pos + n) * unit])
                            left -= n
                            pos = 0
                else:
                    if t.kind == "ones":
                        arr = np.ones(t.ne, dtype="<f4")
                    elif t.kind == "bias":
                        arr = (rng.standard_normal(t.ne, dtype=np.float32) * np.float32(t.std)).astype("<f4")
                    elif t.kind == "rope_freqs":
                        arr = _rope_llama3_factors(s).astype("<f4")
                    else:
                        raise AssertionError(t.kind)
                    assert arr.nbytes == t.nbytes
                    fout.seek(data_start + offset)
                    fout.write(arr.tobytes())
                offset += -(-t.nbytes // _GGUF_ALIGNMENT) * _GGUF_ALIGNMENT
                if pools is not None or t.kind != "random":
                    fout.write(b"\0" * (data_start + offset - fout.tell()))
                    assert fout.tell() == data_start + offset, t.name
            fout.truncate(data_start + offset)  # data=False: ends in a hole
        finally:
            w.close()
    return {"path": path, "shape": s.name, "wtype": wtype, "n_layer": L, "n_tensors": len(plan),
            "bytes": os.path.getsize(path), "seconds": time.perf_counter() - t0}


# --------------------------------------------------------------------------------------------
# command line


def _list() -> str:
    rows = [f"{'shape':<14} {'arch':<6} {'layers':>6} {'embd':>5} {'heads':>6} {'ff':>6} {'vocab':>7} "
            f"{'ctx':>7} {'tied':>4} {'q8_0 GB':>8}"]
    for s in SHAPES.values():
        rows.append(f"{s.name:<14} {s.arch:<6} {s.n_layer:>6} {s.n_embd:>5} {f'{s.n_head}/{s.n_head_kv}':>6} "
                    f"{s.n_ff:>6} {s.n_vocab:>7} {s.n_ctx_train:>7} {'yes' if s.tied_embeddings else 'no':>4} "
                    f"{file_size_estimate(s) / 1e9:>8.2f}")
    return "\n".join(rows)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--shape", help=f"model shape: {', '.join(SHAPES)}")
    ap.add_argument("--wtype", default="q8_0", choices=WTYPES, help="type of the 2-D weights (default q8_0)")
    ap.add_argument("-o", "--output", help="output .gguf path")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-ctx-train", type=int, default=None, help="override {arch}.context_length")
    ap.add_argument("--n-layer", type=int, default=None, help="override the number of blocks")
    ap.add_argument("--random-budgets", action="store_true",
                    help="embed valid random tca.* budgets (calibrated-path benchmarks)")
    ap.add_argument("--no-data", action="store_true",
                    help="leave the weights as a hole (sparse file, all-zero weights): loader tests only")
    ap.add_argument("-f", "--force", action="store_true", help="overwrite OUTPUT if it exists")
    ap.add_argument("--list", action="store_true", help="list the shapes and exit")


def main_cli(a) -> int:
    if a.list:
        print(_list())
        return 0
    if not a.shape or not a.output:
        print("error: --shape and -o/--output are required (or --list)", file=sys.stderr)
        return 2
    if a.shape not in SHAPES:
        print(f"error: unknown shape {a.shape!r} (known: {', '.join(SHAPES)})", file=sys.stderr)
        return 2
    if os.path.exists(a.output) and not a.force:
        print(f"error: {a.output} exists (use --force to overwrite)", file=sys.stderr)
        return 2
    try:
        r = write_random_gguf(a.output, a.shape, a.wtype, seed=a.seed, n_ctx_train=a.n_ctx_train,
                              n_layer=a.n_layer, random_budgets=a.random_budgets,
                              data=not a.no_data)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {r['path']}: {r['shape']} {r['wtype']}, {r['n_layer']} layers, {r['n_tensors']} tensors, "
          f"{r['bytes'] / 1e9:.2f} GB in {r['seconds']:.1f} s")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tca_ggml.random_model", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    return main_cli(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
