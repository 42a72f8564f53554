"""TCA budgets stored as ``tca.*`` GGUF metadata (schema: docs/design.md section 2).

Pure Python: needs only numpy and the ``gguf`` package (no native library).

    md = read_kv("model.gguf")                # every KV pair (Llama.metadata), bounds-checked
    b = read_budgets("model.gguf")            # TCABudgets, or None without any tca.* key
    arch, n_layer, heads = read_model_shape("model.gguf")
    write_calibrated("model.gguf", "model.tca.gguf", b)   # streamed copy + tca.* keys
    strip("model.tca.gguf", "plain.gguf")                 # streamed copy without tca.* keys

Every problem with the ``tca.*`` keys raises :class:`TCAMetadataError`, whose ``key`` attribute
and ``str()`` name the offending key; a file that is not a readable GGUF raises
:class:`GGUFError` (with the path). Both are ``ValueError`` subclasses.

How the file is read. ``gguf.GGUFReader`` cannot be the first thing to touch a file: it walks
every array element in Python with no bounds checks, so an array whose declared length exceeds the
file (truncated or hostile) makes it loop ~2**64 times instead of failing, and it parses the whole
token list into per-element numpy views (1.6 s for SmolLM2-135M, 7.4 s for Qwen2.5-0.5B). So
``_scan`` walks the header with explicit bounds (refusing ``tca.*`` arrays longer than 2**24
before anything is converted) and the few values needed are read from the offsets it found (~10 ms);
``read_kv`` decodes every value from those offsets (0.1-0.3 s for the real models).
``GGUFReader`` (wrapped: any exception becomes GGUFError) is the independent second parser:
it re-reads every copy before the rename, and ``read_budgets(..., cross_check=True)`` compares
its parse of each ``tca.*`` record byte for byte.

Copies (``write_calibrated``/``strip``) keep every non-``tca`` KV record and the tensor-info
block as the exact source bytes, append freshly packed ``tca.*`` records, and stream the data
section (everything from the aligned data offset to EOF) in chunks; relative tensor offsets are
unchanged because the tensor-info block and alignment are unchanged. The result goes to a
temporary file next to ``dst``, is re-read with ``GGUFReader`` and compared with the source
(KV order/types/bytes, tensor names/types/shapes/bytes, decoded budgets) and only then renamed.
"""
from __future__ import annotations

import dataclasses
import json
import math
import mmap
import os
import re
import stat
import struct
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
from gguf import GGUFReader
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

try:  # pragma: no cover - depends on how the module is loaded (see below)
    from ._fsutil import check_output_path
except ImportError:  # pragma: no cover - stand-alone: the same rule, a plain ValueError
    def check_output_path(path) -> None:
        p = os.fspath(path)
        if os.path.exists(p) and not stat.S_ISREG(os.stat(p).st_mode):
            raise ValueError(f"{p} exists and is not a regular file: refusing to replace it")

# Errors join the package hierarchy (errors.py is pure Python) when imported as
# tca_ggml.gguf_meta; loaded stand-alone (spec_from_file_location) they are plain ValueErrors.
try:  # pragma: no cover - depends on how the module is loaded
    from .errors import ModelLoadError as _GGUFErrorBase, TCAConfigError as _MetaErrorBase
except ImportError:  # pragma: no cover
    _GGUFErrorBase = ValueError
    _MetaErrorBase = ValueError

__all__ = [
    "SCHEMA_VERSION", "KNOWN_VERSIONS", "MAX_ARRAY_LEN", "TCA_PREFIX",
    "TCAMetadataError", "GGUFError", "TCABudgets",
    "read_kv", "read_budgets", "read_model_shape", "list_tca_keys", "write_calibrated", "strip",
    "tca_kv_items", "add_to_writer", "log_gaussian_grid", "make_random_budgets",
]

# 1: budgets calibrated for the "stream" retention (chunked / single-shot calibration);
# 2: for the "hold" retention (final-selection calibration, calibration.calibrate_head_final).
# Same keys and meaning of every key; readers accept both.
SCHEMA_VERSION = 2
KNOWN_VERSIONS = (1, 2)
MAX_ARRAY_LEN = 1 << 24          # arrays longer than this are refused (design.md section 2)
MAX_BLOCK_SIZE = 4096
P_SUM_TOL = 1e-3                 # p rows must sum to 1 +- this
DENSITY_TOL = 1e-3               # |density - sum_k k p_k / b| tolerance
TCA_PREFIX = "tca."
DEFAULT_ALIGNMENT = 32
GGML_MAX_DIMS = 4

_COPY_CHUNK = 16 << 20           # bytes per read/write/compare step when streaming tensor data
_MAX_KEY_LEN = 1 << 16
_MAX_NESTING = 8

VT = GGUFValueType
_U32_MAX = (1 << 32) - 1
_SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")


def _default_tool() -> str:
    try:
        from importlib.metadata import version
        return f"tca_ggml {version('tca_ggml')}"
    except Exception:
        return "tca_ggml 0.1.0"


DEFAULT_TOOL = _default_tool()


# --------------------------------------------------------------------------------------------
# errors

class TCAMetadataError(_MetaErrorBase):
    """A ``tca.*`` key is missing, has the wrong type/length, or a value breaks a schema rule."""

    def __init__(self, key: str, message: str, path: Optional[Union[str, os.PathLike]] = None):
        self.key = key
        self.message = message
        self.path = None if path is None else str(path)
        super().__init__(key, message)

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        return f"{where}{self.key}: {self.message}"


class GGUFError(_GGUFErrorBase):
    """The file is not a readable GGUF (bad magic, truncated, corrupt structure)."""

    def __init__(self, path: Union[str, os.PathLike], message: str):
        self.path = str(path)
        self.message = message
        super().__init__(self.path, message)

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


# --------------------------------------------------------------------------------------------
# schema

_SCALAR_FMT = {
    VT.UINT8: "B", VT.INT8: "b", VT.UINT16: "H", VT.INT16: "h", VT.UINT32: "I", VT.INT32: "i",
    VT.FLOAT32: "f", VT.BOOL: "?", VT.UINT64: "Q", VT.INT64: "q", VT.FLOAT64: "d",
}
_SCALAR_SIZE = {t: struct.calcsize("<" + f) for t, f in _SCALAR_FMT.items()}
_NP_TYPE = {
    VT.UINT8: np.uint8, VT.INT8: np.int8, VT.UINT16: np.uint16, VT.INT16: np.int16,
    VT.UINT32: np.uint32, VT.INT32: np.int32, VT.FLOAT32: np.float32, VT.BOOL: np.bool_,
    VT.UINT64: np.uint64, VT.INT64: np.int64, VT.FLOAT64: np.float64,
}
_INT_TYPES = (VT.UINT8, VT.INT8, VT.UINT16, VT.INT16, VT.UINT32, VT.INT32, VT.UINT64, VT.INT64)
_TYPE_NAME = {
    VT.UINT8: "u8", VT.INT8: "i8", VT.UINT16: "u16", VT.INT16: "i16", VT.UINT32: "u32",
    VT.INT32: "i32", VT.FLOAT32: "f32", VT.BOOL: "bool", VT.STRING: "str", VT.ARRAY: "arr",
    VT.UINT64: "u64", VT.INT64: "i64", VT.FLOAT64: "f64",
}

# (key, attribute, value type, array element type or None), in write order (design.md table).
SCHEMA = (
    ("tca.version", "version", VT.UINT32, None),
    ("tca.block_size", "block_size", VT.UINT32, None),
    ("tca.window", "window", VT.UINT32, None),
    ("tca.n_sink", "n_sink", VT.UINT32, None),
    ("tca.tau", "tau", VT.FLOAT32, None),
    ("tca.alpha", "alpha", VT.FLOAT32, None),
    ("tca.k_values", "k_values", VT.ARRAY, VT.UINT32),
    ("tca.grid.mu", "grid_mu", VT.ARRAY, VT.FLOAT32),
    ("tca.grid.sigma", "grid_sigma", VT.ARRAY, VT.FLOAT32),
    ("tca.n_layer", "n_layer", VT.UINT32, None),
    ("tca.n_head_kv", "n_head_kv", VT.ARRAY, VT.UINT32),
    ("tca.budget.candidate", "candidate", VT.ARRAY, VT.INT32),
    ("tca.budget.p", "p", VT.ARRAY, VT.FLOAT32),
    ("tca.budget.density", "density", VT.ARRAY, VT.FLOAT32),
    ("tca.coverage", "coverage", VT.ARRAY, VT.FLOAT32),
    ("tca.calib.text_name", "calib_text_name", VT.STRING, None),
    ("tca.calib.text_sha256", "calib_text_sha256", VT.STRING, None),
    ("tca.calib.n_tokens", "calib_n_tokens", VT.UINT32, None),
    ("tca.calib.tool", "calib_tool", VT.STRING, None),
)
_KEY_OF = {attr: key for key, attr, _, _ in SCHEMA}


def _type_str(vtype, subtype=None) -> str:
    if vtype == VT.ARRAY:
        return f"arr[{_TYPE_NAME.get(subtype, str(subtype))}]"
    return _TYPE_NAME.get(vtype, str(vtype))


# --------------------------------------------------------------------------------------------
# TCABudgets

def _as_array(attr: str, value: Any, dtype) -> np.ndarray:
    try:
        with np.errstate(all="ignore"):
            arr = np.array(value, dtype=dtype, copy=True)
    except (TypeError, ValueError, OverflowError) as e:
        raise TCAMetadataError(_KEY_OF[attr], f"cannot convert to {np.dtype(dtype).name} array: {e}") from e
    if dtype is not np.float32 and np.asarray(value).dtype.kind == "f":
        raise TCAMetadataError(_KEY_OF[attr], "expected integers, got floating-point values")
    return arr


@dataclass(eq=False)
class TCABudgets:
    """Everything in the ``tca.*`` schema. Per-head arrays are layer-major (``head_offset``)."""

    block_size: int
    window: int
    tau: float
    alpha: float
    k_values: np.ndarray        # uint32 [K]: 1, 2, 4, ..., block_size
    grid_mu: np.ndarray         # float32 [M]
    grid_sigma: np.ndarray      # float32 [M]
    n_layer: int
    n_head_kv: list             # list[int], len n_layer
    candidate: np.ndarray       # int32 [H], -1 = dense
    p: np.ndarray               # float32 [H, K]
    density: np.ndarray         # float32 [H]
    coverage: np.ndarray        # float32 [H]
    calib_text_name: str
    calib_text_sha256: str
    calib_n_tokens: int
    n_sink: int = 4
    calib_tool: str = DEFAULT_TOOL
    version: int = SCHEMA_VERSION

    def __post_init__(self):
        for attr in ("version", "block_size", "window", "n_sink", "n_layer", "calib_n_tokens"):
            v = getattr(self, attr)
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
                raise TCAMetadataError(_KEY_OF[attr], f"expected an integer, got {type(v).__name__}")
            setattr(self, attr, int(v))
        for attr in ("tau", "alpha"):
            v = getattr(self, attr)
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
                raise TCAMetadataError(_KEY_OF[attr], f"expected a float, got {type(v).__name__}")
            # stored as f32 in the file: keep the f32 value so a round trip compares equal
            with np.errstate(all="ignore"):
                setattr(self, attr, float(np.float32(v)))
        for attr in ("calib_text_name", "calib_text_sha256", "calib_tool"):
            v = getattr(self, attr)
            if not isinstance(v, str):
                raise TCAMetadataError(_KEY_OF[attr], f"expected a string, got {type(v).__name__}")
        if isinstance(self.n_head_kv, (int, np.integer)) and not isinstance(self.n_head_kv, bool):
            self.n_head_kv = [int(self.n_head_kv)] * self.n_layer
        self.n_head_kv = [int(x) for x in _as_array("n_head_kv", self.n_head_kv, np.int64).reshape(-1)]
        self.k_values = _as_array("k_values", self.k_values, np.int64).reshape(-1)
        if self.k_values.size and (self.k_values.min() < 0 or self.k_values.max() > _U32_MAX):
            raise TCAMetadataError("tca.k_values", "values out of u32 range")
        self.k_values = self.k_values.astype(np.uint32)
        self.grid_mu = _as_array("grid_mu", self.grid_mu, np.float32).reshape(-1)
        self.grid_sigma = _as_array("grid_sigma", self.grid_sigma, np.float32).reshape(-1)
        cand = _as_array("candidate", self.candidate, np.int64).reshape(-1)
        if cand.size and (cand.min() < -(1 << 31) or cand.max() >= (1 << 31)):
            raise TCAMetadataError("tca.budget.candidate", "values out of i32 range")
        self.candidate = cand.astype(np.int32)
        self.p = _as_array("p", self.p, np.float32)
        K = int(self.k_values.size)
        if self.p.ndim == 1 and K > 0 and self.p.size % K == 0:
            self.p = self.p.reshape(-1, K)
        self.density = _as_array("density", self.density, np.float32).reshape(-1)
        self.coverage = _as_array("coverage", self.coverage, np.float32).reshape(-1)

    # ---- derived
    @property
    def n_heads_total(self) -> int:
        """H = sum of n_head_kv."""
        return int(sum(self.n_head_kv))

    @property
    def head_offset(self) -> list:
        """Prefix sums of n_head_kv (length n_layer + 1); head (l, g) is index head_offset[l] + g."""
        out = [0]
        for n in self.n_head_kv:
            out.append(out[-1] + int(n))
        return out

    def head_index(self, layer: int, kv_head: int) -> int:
        if not (0 <= layer < self.n_layer and 0 <= kv_head < self.n_head_kv[layer]):
            raise IndexError(f"no KV head ({layer}, {kv_head})")
        return self.head_offset[layer] + kv_head

    def expected_density(self) -> np.ndarray:
        """sum_k k p_k / b per head (float64)."""
        return (self.p.astype(np.float64) @ self.k_values.astype(np.float64)) / float(self.block_size)

    # ---- validation
    def validate(self, model_n_layer: Optional[int] = None,
                 model_n_head_kv: Optional[Union[int, Sequence[int]]] = None) -> "TCABudgets":
        """Check every rule of design.md section 2 (and the model's shape when given).

        Raises TCAMetadataError naming the first offending key; returns self on success.
        Fields assigned after construction are re-normalised (types/dtypes) first.
        """
        self.__post_init__()
        def fail(attr_or_key, msg):
            raise TCAMetadataError(_KEY_OF.get(attr_or_key, attr_or_key), msg)

        def u32(attr):
            v = getattr(self, attr)
            if not 0 <= v <= _U32_MAX:
                fail(attr, f"{v} is out of u32 range")
            return v

        if self.version not in KNOWN_VERSIONS:
            fail("version", f"unknown schema version {self.version} (known: {list(KNOWN_VERSIONS)})")
        for a in ("block_size", "window", "n_sink", "n_layer", "calib_n_tokens"):
            u32(a)
        b = self.block_size
        if not (1 <= b <= MAX_BLOCK_SIZE and (b & (b - 1)) == 0):
            fail("block_size", f"{b} is not a power of two in [1, {MAX_BLOCK_SIZE}]")
        if self.window % b != 0:
            fail("window", f"{self.window} is not a multiple of block_size {b}")
        if not (math.isfinite(self.tau) and 0.0 < self.tau <= 1.0):
            fail("tau", f"{self.tau} is not in (0, 1]")
        if not (math.isfinite(self.alpha) and 0.0 <= self.alpha <= 1.0):
            fail("alpha", f"{self.alpha} is not in [0, 1]")

        # k_values: 1, 2, 4, ..., b
        expect_k = [1 << i for i in range(b.bit_length())]
        self._check_len("k_values", self.k_values, len(expect_k))
        if self.k_values.tolist() != expect_k:
            fail("k_values", f"must be the powers of two 1..{b} ascending, got {self.k_values.tolist()[:16]}")
        K = len(expect_k)

        # grid
        M = int(self.grid_mu.size)
        self._check_len("grid_mu", self.grid_mu, None)
        if M < 1:
            fail("grid_mu", "empty candidate grid")
        self._check_len("grid_sigma", self.grid_sigma, M)
        self._check_finite("grid_mu", self.grid_mu)
        self._check_finite("grid_sigma", self.grid_sigma)
        if np.any(self.grid_sigma <= 0):
            fail("grid_sigma", "spreads must be > 0")

        # layers / heads
        if self.n_layer < 1:
            fail("n_layer", "must be >= 1")
        if len(self.n_head_kv) != self.n_layer:
            fail("n_head_kv", f"length {len(self.n_head_kv)}, expected n_layer = {self.n_layer}")
        if any(not 0 <= h <= _U32_MAX for h in self.n_head_kv):
            fail("n_head_kv", "values out of u32 range")
        H = self.n_heads_total
        if H < 1:
            fail("n_head_kv", "no KV heads at all")
        if H > MAX_ARRAY_LEN or H * K > MAX_ARRAY_LEN:
            fail("n_head_kv", f"H = {H} heads (x {K} k-values) exceeds the array limit {MAX_ARRAY_LEN}")

        # per-head arrays
        self._check_len("candidate", self.candidate, H)
        if self.candidate.size and (self.candidate.min() < -1 or self.candidate.max() >= M):
            bad = int(np.flatnonzero((self.candidate < -1) | (self.candidate >= M))[0])
            fail("candidate", f"head {bad}: {int(self.candidate[bad])} not in [-1, {M})")

        if self.p.ndim != 2 or self.p.shape != (H, K):
            fail("p", f"length {self.p.size} (shape {tuple(self.p.shape)}), expected H x K = {H} x {K} = {H * K}")
        self._check_finite("p", self.p)
        if np.any(self.p < 0):
            bad = int(np.flatnonzero((self.p < 0).any(axis=1))[0])
            fail("p", f"head {bad}: negative probability")
        sums = self.p.astype(np.float64).sum(axis=1)
        off = np.abs(sums - 1.0) > P_SUM_TOL
        if np.any(off):
            bad = int(np.flatnonzero(off)[0])
            fail("p", f"head {bad}: row sums to {sums[bad]:.6f}, expected 1 +- {P_SUM_TOL}")
        dense = self.candidate == -1
        if np.any(dense & (self.p[:, -1] < 1.0 - P_SUM_TOL)):
            bad = int(np.flatnonzero(dense & (self.p[:, -1] < 1.0 - P_SUM_TOL))[0])
            fail("p", f"head {bad} is dense (candidate -1) but p is not one-hot at k = {b}")

        self._check_len("density", self.density, H)
        self._check_finite("density", self.density)
        if np.any((self.density <= 0) | (self.density > 1)):
            bad = int(np.flatnonzero((self.density <= 0) | (self.density > 1))[0])
            fail("density", f"head {bad}: {float(self.density[bad])} not in (0, 1]")
        dev = np.abs(self.density.astype(np.float64) - self.expected_density())
        if np.any(dev > DENSITY_TOL):
            bad = int(np.argmax(dev))
            fail("density", f"head {bad}: {float(self.density[bad]):.6f} != sum_k k p_k / b = "
                            f"{self.expected_density()[bad]:.6f}")

        self._check_len("coverage", self.coverage, H)
        self._check_finite("coverage", self.coverage)
        if np.any((self.coverage < 0) | (self.coverage > 1 + 1e-6)):
            bad = int(np.flatnonzero((self.coverage < 0) | (self.coverage > 1 + 1e-6))[0])
            fail("coverage", f"head {bad}: {float(self.coverage[bad])} not in [0, 1]")

        if not _SHA256_RE.fullmatch(self.calib_text_sha256):
            fail("calib_text_sha256", f"not a hex sha256: {self.calib_text_sha256[:80]!r}")

        # the model this is meant for
        if model_n_layer is not None and int(model_n_layer) != self.n_layer:
            fail("n_layer", f"budgets cover {self.n_layer} layers, the model has {int(model_n_layer)}")
        if model_n_head_kv is not None:
            if isinstance(model_n_head_kv, (int, np.integer)):
                model_heads = [int(model_n_head_kv)] * self.n_layer
            else:
                model_heads = [int(x) for x in model_n_head_kv]
            if model_heads != list(self.n_head_kv):
                bad = next((i for i, (a, c) in enumerate(zip(self.n_head_kv, model_heads)) if a != c),
                           min(len(model_heads), len(self.n_head_kv)))
                fail("n_head_kv", f"KV heads per layer {self.n_head_kv} do not match the model's "
                                  f"{model_heads} (first difference at layer {bad})")
        return self

    def _check_len(self, attr, arr, n):
        if arr.size > MAX_ARRAY_LEN:
            raise TCAMetadataError(_KEY_OF[attr], f"{arr.size} elements exceeds the limit {MAX_ARRAY_LEN}")
        if n is not None and arr.size != n:
            raise TCAMetadataError(_KEY_OF[attr], f"length {arr.size}, expected {n}")

    @staticmethod
    def _check_finite(attr, arr):
        if not np.all(np.isfinite(arr)):
            bad = int(np.flatnonzero(~np.isfinite(arr.reshape(-1)))[0])
            raise TCAMetadataError(_KEY_OF[attr], f"non-finite value {arr.reshape(-1)[bad]} at index {bad}")

    # ---- reporting
    def per_layer_summary(self) -> list:
        """One dict per layer: n_head_kv, density mean/min/max, dense heads, coverage mean/min."""
        out = []
        offs = self.head_offset
        for layer in range(self.n_layer):
            sl = slice(offs[layer], offs[layer + 1])
            d = self.density[sl].astype(np.float64)
            c = self.coverage[sl].astype(np.float64)
            n = int(d.size)
            out.append({
                "layer": layer,
                "n_head_kv": n,
                "density_mean": float(d.mean()) if n else None,
                "density_min": float(d.min()) if n else None,
                "density_max": float(d.max()) if n else None,
                "n_dense": int(np.count_nonzero(self.candidate[sl] == -1)),
                "coverage_mean": float(c.mean()) if n else None,
                "coverage_min": float(c.min()) if n else None,
            })
        return out

    def to_dict(self) -> dict:
        d = {}
        for key, attr, _, _ in SCHEMA:
            v = getattr(self, attr)
            d[attr] = v.tolist() if isinstance(v, np.ndarray) else v
        return d

    def to_json(self, indent: Optional[int] = None, summary: bool = False) -> str:
        d = self.to_dict()
        if summary:
            d["per_layer_summary"] = self.per_layer_summary()
        return json.dumps(d, indent=indent)

    @classmethod
    def from_dict(cls, d: dict) -> "TCABudgets":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def __eq__(self, other) -> bool:
        if not isinstance(other, TCABudgets):
            return NotImplemented
        for f in dataclasses.fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
                a, b = np.asarray(a), np.asarray(b)
                if a.shape != b.shape or a.dtype != b.dtype or not np.array_equal(a, b, equal_nan=True):
                    return False
            elif isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
                continue
            elif a != b:
                return False
        return True

    __hash__ = None  # mutable


# --------------------------------------------------------------------------------------------
# budgets <-> KV items

def tca_kv_items(budgets: TCABudgets) -> list:
    """[(key, GGUFValueType, value, sub_type)] in schema order; arrays as Python lists, so the
    items can be given to ``GGUFWriter.add_key_value(key, value, vtype, sub_type=...)``."""
    items = []
    for key, attr, vtype, sub in SCHEMA:
        v = getattr(budgets, attr)
        if vtype == VT.ARRAY:
            v = np.asarray(v, dtype=_NP_TYPE[sub]).reshape(-1).tolist()
        items.append((key, vtype, v, sub))
    return items


def add_to_writer(writer, budgets: TCABudgets) -> None:
    """Add the tca.* keys to a ``gguf.GGUFWriter`` (validated first)."""
    budgets.validate()
    for key, vtype, value, sub in tca_kv_items(budgets):
        writer.add_key_value(key, value, vtype, sub_type=sub)


def _pack_string(s: Union[str, bytes], bo: str) -> bytes:
    raw = s.encode("utf-8") if isinstance(s, str) else bytes(s)
    return struct.pack(bo + "Q", len(raw)) + raw


def _pack_kv(key: str, vtype, value, sub, bo: str) -> bytes:
    """One KV record in the file's byte order (bo is '<' or '>'). Arrays packed with numpy."""
    out = _pack_string(key, bo) + struct.pack(bo + "I", int(vtype))
    if vtype == VT.STRING:
        out += _pack_string(value, bo)
    elif vtype == VT.ARRAY:
        arr = np.asarray(value, dtype=np.dtype(_NP_TYPE[sub]).newbyteorder(bo)).reshape(-1)
        out += struct.pack(bo + "IQ", int(sub), arr.size) + arr.tobytes()
    else:
        out += struct.pack(bo + _SCALAR_FMT[vtype], value)
    return out


# --------------------------------------------------------------------------------------------
# structural scan (bounds-checked; protects GGUFReader from hostile/truncated files)

@dataclass
class _KV:
    key: str
    start: int        # offset of the record (key length)
    end: int          # offset after the record
    vtype: int
    subtype: Optional[int]
    count: int        # array length (1 for scalars/strings)
    value_off: int    # offset of the value; for arrays, of the first element


@dataclass
class _Tensor:
    name: str
    ggml_type: int
    shape: tuple
    offset: int       # relative to data section
    nbytes: int


@dataclass
class _Layout:
    path: str
    size: int
    bo: str           # '<' or '>'
    version: int
    kv: "OrderedDict[str, _KV]"
    kv_start: int
    ti_start: int
    ti_end: int
    alignment: int
    data_offset: int
    tensors: list


def _scan(path, refuse_huge_tca: bool = True) -> _Layout:
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise GGUFError(path, f"cannot stat: {e}") from e
    if not stat.S_ISREG(st.st_mode):  # a FIFO would block open() forever
        raise GGUFError(path, "not a regular file (a model must be a .gguf file)")
    size = st.st_size
    if size < 24:
        raise GGUFError(path, f"not a GGUF file (only {size} bytes)")
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        return _scan_mm(path, mm, size, refuse_huge_tca)
    finally:
        mm.close()


def _scan_mm(path, mm, size, refuse_huge_tca) -> _Layout:
    def bad(msg):
        raise GGUFError(path, msg)

    def need(off, n, what):
        if n < 0 or off + n > size:
            bad(f"truncated or corrupt: {what} at offset {off} needs {n} bytes, file has {size}")

    if mm[0:4] != b"GGUF":
        bad("not a GGUF file (bad magic)")
    (version,) = struct.unpack_from("<I", mm, 4)
    bo = "<"
    if version & 0xFFFF == 0:
        bo = ">"
        (version,) = struct.unpack_from(">I", mm, 4)
    if version not in (2, 3):
        bad(f"unsupported GGUF version {version}")
    n_tensors, n_kv = struct.unpack_from(bo + "QQ", mm, 8)
    off = 24
    if n_kv * 13 > size - off:
        bad(f"corrupt header: {n_kv} KV pairs cannot fit in {size} bytes")
    if n_tensors * 24 > size - off:
        bad(f"corrupt header: {n_tensors} tensors cannot fit in {size} bytes")

    def read_str(off, what, limit=None):
        need(off, 8, what)
        (n,) = struct.unpack_from(bo + "Q", mm, off)
        if limit is not None and n > limit:
            bad(f"{what} at offset {off} is {n} bytes long")
        need(off + 8, n, what)
        return off + 8 + n, n

    def read_name(off, kind, i, seen):
        """The i-th key or tensor name: bounded length, UTF-8, not in seen. (offset after, name)"""
        what = f"{kind} #{i}"
        end, n = read_str(off, what, _MAX_KEY_LEN)
        try:
            name = bytes(mm[end - n:end]).decode("utf-8")
        except UnicodeDecodeError:
            bad(f"{what} at offset {off} is not UTF-8")
        if name in seen:
            bad(f"duplicate {kind} {name!r}")
        return end, name

    def skip_value(off, vtype, key, depth):
        if vtype in _SCALAR_SIZE:
            need(off, _SCALAR_SIZE[vtype], f"value of {key!r}")
            return off + _SCALAR_SIZE[vtype]
        if vtype == VT.STRING:
            return read_str(off, f"string value of {key!r}")[0]
        if vtype == VT.ARRAY:
            if depth >= _MAX_NESTING:
                bad(f"{key!r}: arrays nested deeper than {_MAX_NESTING}")
            need(off, 12, f"array header of {key!r}")
            sub, count = struct.unpack_from(bo + "IQ", mm, off)
            off += 12
            return skip_array(off, sub, count, key, depth)
        bad(f"{key!r}: unknown value type {vtype}")

    def skip_array(off, sub, count, key, depth):
        if sub in _SCALAR_SIZE:
            need(off, count * _SCALAR_SIZE[sub], f"array data of {key!r} ({count} elements)")
            return off + count * _SCALAR_SIZE[sub]
        if sub == VT.STRING:
            need(off, count * 8, f"string array of {key!r} ({count} elements)")
            unpack = struct.Struct(bo + "Q").unpack_from
            for _ in range(count):
                if off + 8 > size:
                    need(off, 8, f"string array of {key!r}")
                (n,) = unpack(mm, off)
                off += 8 + n
                if off > size:
                    need(off - n, n, f"string array element of {key!r}")
            return off
        if sub == VT.ARRAY:
            need(off, count * 12, f"nested array of {key!r} ({count} elements)")
            for _ in range(count):
                off = skip_value(off, VT.ARRAY, key, depth + 1)
            return off
        bad(f"{key!r}: unknown array element type {sub}")

    kvs: "OrderedDict[str, _KV]" = OrderedDict()
    for i in range(n_kv):
        start = off
        off, key = read_name(off, "key", i, kvs)
        need(off, 4, f"type of {key!r}")
        (vtype,) = struct.unpack_from(bo + "I", mm, off)
        off += 4
        sub, count, value_off = None, 1, off
        if vtype == VT.ARRAY:
            need(off, 12, f"array header of {key!r}")
            sub, count = struct.unpack_from(bo + "IQ", mm, off)
            value_off = off + 12
            if refuse_huge_tca and key.startswith(TCA_PREFIX) and count > MAX_ARRAY_LEN:
                raise TCAMetadataError(key, f"array of {count} elements exceeds the limit {MAX_ARRAY_LEN}",
                                       path=path)
            off = skip_array(value_off, sub, count, key, 1)
        else:
            off = skip_value(off, vtype, key, 0)
        kvs[key] = _KV(key, start, off, vtype, sub, count, value_off)

    alignment = DEFAULT_ALIGNMENT
    if "general.alignment" in kvs:
        a = kvs["general.alignment"]
        if a.vtype != VT.UINT32:
            bad(f"general.alignment has type {_type_str(a.vtype, a.subtype)}, expected u32")
        (alignment,) = struct.unpack_from(bo + "I", mm, a.value_off)
        if alignment == 0 or alignment & (alignment - 1):
            bad(f"general.alignment {alignment} is not a power of two")

    ti_start = off
    tensors = []
    names = set()
    for i in range(n_tensors):
        off, name = read_name(off, "tensor", i, names)
        names.add(name)
        need(off, 4, f"n_dims of tensor {name!r}")
        (n_dims,) = struct.unpack_from(bo + "I", mm, off)
        off += 4
        if n_dims > GGML_MAX_DIMS:
            bad(f"tensor {name!r} has {n_dims} dims (max {GGML_MAX_DIMS})")
        need(off, 8 * n_dims + 12, f"info of tensor {name!r}")
        shape = struct.unpack_from(bo + "Q" * n_dims, mm, off)
        off += 8 * n_dims
        gtype, toff = struct.unpack_from(bo + "IQ", mm, off)
        off += 12
        try:
            blk, tsize = GGML_QUANT_SIZES[GGMLQuantizationType(gtype)]
        except (ValueError, KeyError):
            bad(f"tensor {name!r} has unknown ggml type {gtype}")
        n_el = 1
        for d in shape:
            n_el *= int(d)
        if n_dims and shape[0] % blk:
            bad(f"tensor {name!r}: row size {shape[0]} not a multiple of block size {blk}")
        nbytes = n_el // blk * tsize
        if toff % alignment:
            bad(f"tensor {name!r}: data offset {toff} not aligned to {alignment}")
        tensors.append(_Tensor(name, gtype, tuple(int(d) for d in shape), int(toff), int(nbytes)))
    ti_end = off
    data_offset = -(-ti_end // alignment) * alignment
    for t in tensors:
        if data_offset + t.offset + t.nbytes > size:
            bad(f"truncated: data of tensor {t.name!r} ends at {data_offset + t.offset + t.nbytes}, "
                f"file has {size} bytes")
    return _Layout(path, size, bo, version, kvs, 24, ti_start, ti_end, alignment, data_offset, tensors)


def _open_reader(path) -> GGUFReader:
    """gguf.GGUFReader, with any failure on a corrupt file turned into GGUFError.

    Only call after ``_scan`` accepted the file: the reader has no bounds checks of its own."""
    try:
        return GGUFReader(os.fspath(path), "r")
    except Exception as e:  # the reader raises ValueError/KeyError/IndexError/... on corrupt input
        raise GGUFError(path, f"GGUFReader cannot read it ({type(e).__name__}: {e})") from e


# --------------------------------------------------------------------------------------------
# reading

def _read_value(f, layout: _Layout, kv: _KV):
    """Decode a scalar, string or numeric-array value at the offsets found by _scan.
    Arrays come back as numpy arrays in native byte order (never as Python lists)."""
    bo = layout.bo
    f.seek(kv.value_off)
    if kv.vtype == VT.STRING:
        (n,) = struct.unpack(bo + "Q", f.read(8))
        return f.read(n)                                   # bytes; caller decodes
    if kv.vtype == VT.ARRAY:
        dt = np.dtype(_NP_TYPE[kv.subtype])
        raw = f.read(kv.count * dt.itemsize)
        return np.frombuffer(raw, dtype=dt.newbyteorder(bo), count=kv.count).astype(dt)
    (v,) = struct.unpack(bo + _SCALAR_FMT[kv.vtype], f.read(_SCALAR_SIZE[kv.vtype]))
    return v


def _decode(buf, bo: str, off: int, vtype: int, sub: Optional[int] = None, count: int = 1):
    """Decode one value from ``buf`` (bytes-like, already bounds-checked by ``_scan``) at
    ``off``; returns ``(value, next offset)``. Strings are decoded as UTF-8 with replacement;
    arrays become Python lists (numeric ones through numpy, so elements are Python scalars)."""
    if vtype == VT.STRING:
        (n,) = struct.unpack_from(bo + "Q", buf, off)
        return bytes(buf[off + 8:off + 8 + n]).decode("utf-8", "replace"), off + 8 + n
    if vtype != VT.ARRAY:
        return struct.unpack_from(bo + _SCALAR_FMT[vtype], buf, off)[0], off + _SCALAR_SIZE[vtype]
    if sub in _NP_TYPE:
        dt = np.dtype(_NP_TYPE[sub])
        arr = np.frombuffer(buf, dtype=dt.newbyteorder(bo), count=count, offset=off)
        return arr.tolist(), off + count * dt.itemsize
    out = []
    if sub == VT.STRING:
        unpack = struct.Struct(bo + "Q").unpack_from
        for _ in range(count):
            (n,) = unpack(buf, off)
            out.append(bytes(buf[off + 8:off + 8 + n]).decode("utf-8", "replace"))
            off += 8 + n
        return out, off
    for _ in range(count):                                  # nested arrays (bounded by _scan)
        inner_sub, inner_count = struct.unpack_from(bo + "IQ", buf, off)
        v, off = _decode(buf, bo, off + 12, VT.ARRAY, inner_sub, inner_count)
        out.append(v)
    return out, off


def read_kv(path) -> dict:
    """Every KV pair of a GGUF, in file order, through the bounds-checked scan (a truncated or
    hostile file raises GGUFError; ``tca.*`` keys are not validated here: ``read_budgets``).

    Values: str (UTF-8, invalid bytes replaced), int, float, bool; arrays as lists of those
    (nested arrays as nested lists). This is what ``Llama.metadata`` returns."""
    layout = _scan(path, refuse_huge_tca=False)
    with open(os.fspath(path), "rb") as f:
        head = f.read(layout.ti_start)                      # header + KV section only
    return {key: _decode(head, layout.bo, kv.value_off, kv.vtype, kv.subtype, kv.count)[0]
            for key, kv in layout.kv.items()}


def _read_key(f, layout: _Layout, key: str, vtype, sub, path):
    kv = layout.kv.get(key)
    if kv is None:
        raise TCAMetadataError(key, f"missing (required by tca.version {SCHEMA_VERSION})", path=path)
    if kv.vtype != vtype or (vtype == VT.ARRAY and kv.subtype != sub):
        raise TCAMetadataError(key, f"has type {_type_str(kv.vtype, kv.subtype)}, expected "
                                    f"{_type_str(vtype, sub)}", path=path)
    if vtype == VT.ARRAY and kv.count > MAX_ARRAY_LEN:   # (already refused by _scan)
        raise TCAMetadataError(key, f"array of {kv.count} elements exceeds the limit {MAX_ARRAY_LEN}", path=path)
    val = _read_value(f, layout, kv)
    if vtype == VT.STRING:
        # GGUF strings are length-prefixed, but llama.cpp hands them out as C strings
        # (gguf_get_val_str): the library -- and the native budget reader -- sees a string up to its
        # first NUL. Read the same, so that both readers take or refuse the same file (fuzz find:
        # b"t\0\0\0\x80..." was "t" natively and invalid UTF-8 here)
        val = val.split(b"\x00", 1)[0]
        try:
            return val.decode("utf-8")
        except UnicodeDecodeError as e:
            raise TCAMetadataError(key, f"string is not UTF-8: {e}", path=path) from e
    if vtype == VT.ARRAY:
        if val.dtype.kind == "f" and not np.all(np.isfinite(val)):
            i = int(np.flatnonzero(~np.isfinite(val))[0])
            raise TCAMetadataError(key, f"non-finite value {val[i]} at index {i}", path=path)
        return val
    if vtype == VT.FLOAT32:
        if not math.isfinite(val):
            raise TCAMetadataError(key, f"non-finite value {val}", path=path)
        return float(val)
    return int(val)


def _cross_check(path, layout: _Layout, keys) -> None:
    """Parse the file again with gguf.GGUFReader and require identical types and record bytes."""
    reader = _open_reader(path)
    with open(path, "rb") as f:
        for key in keys:
            kv, field = layout.kv.get(key), reader.get_field(key)
            if kv is None or field is None:
                raise GGUFError(path, f"GGUFReader and the scan disagree on the presence of {key}")
            f.seek(kv.start)
            if f.read(kv.end - kv.start) != b"".join(p.tobytes() for p in field.parts) or \
               int(field.types[0]) != kv.vtype:
                raise GGUFError(path, f"GGUFReader and the scan disagree on {key}")


def _budgets_from(path, layout: _Layout) -> Optional[TCABudgets]:
    if "tca.version" not in layout.kv:
        others = [k for k in layout.kv if k.startswith(TCA_PREFIX)]
        if not others:
            return None                                     # not calibrated
        # other tca.* keys without tca.version: damaged or incomplete, not "not calibrated"
        raise TCAMetadataError("tca.version", f"missing, but the file has {len(others)} other tca.* "
                                              f"key{'s' if len(others) > 1 else ''} ({', '.join(others[:3])}"
                                              f"{', ...' if len(others) > 3 else ''}): a malformed or incomplete "
                                              f"TCA calibration; recalibrate it (tca-ggml calibrate) or remove "
                                              f"the tca.* keys (tca-ggml strip)", path=path)
    values = {}
    with open(path, "rb") as f:
        for key, attr, vtype, sub in SCHEMA:
            values[attr] = _read_key(f, layout, key, vtype, sub, path)
            if attr == "version" and values[attr] not in KNOWN_VERSIONS:
                raise TCAMetadataError(key, f"unknown schema version {values[attr]} "
                                            f"(known: {list(KNOWN_VERSIONS)})", path=path)
    H = int(values["n_head_kv"].astype(np.int64).sum())
    K = int(values["k_values"].size)
    # explicit length checks with the key named, before any reshape
    for key, attr, n in (("tca.n_head_kv", "n_head_kv", values["n_layer"]),
                         ("tca.budget.candidate", "candidate", H),
                         ("tca.budget.p", "p", H * K),
                         ("tca.budget.density", "density", H),
                         ("tca.coverage", "coverage", H)):
        if values[attr].size != n:
            what = {"p": f"H x K = {H} x {K} = {H * K}", "n_head_kv": f"tca.n_layer = {n}"}.get(attr, f"H = {H}")
            raise TCAMetadataError(key, f"length {values[attr].size}, expected {what}", path=path)
    values["n_head_kv"] = values["n_head_kv"].tolist()
    try:
        return TCABudgets(**values)
    except TCAMetadataError as e:
        e.path = str(path)
        raise


def _model_shape(path, layout: _Layout):
    def int_key(f, key):
        kv = layout.kv.get(key)
        if kv is None:
            raise GGUFError(path, f"model metadata {key} missing")
        if kv.vtype not in _INT_TYPES:
            raise GGUFError(path, f"model metadata {key} has type {_type_str(kv.vtype, kv.subtype)}, "
                                  f"expected an integer")
        return int(_read_value(f, layout, kv))

    with open(path, "rb") as f:
        kv = layout.kv.get("general.architecture")
        if kv is None or kv.vtype != VT.STRING:
            raise GGUFError(path, "general.architecture missing or not a string")
        try:
            arch = _read_value(f, layout, kv).decode("utf-8")
        except UnicodeDecodeError as e:
            raise GGUFError(path, "general.architecture is not UTF-8") from e
        n_layer = int_key(f, f"{arch}.block_count")
        key = f"{arch}.attention.head_count_kv"
        if key not in layout.kv:            # llama.cpp: n_head_kv defaults to n_head
            key = f"{arch}.attention.head_count"
        kv = layout.kv.get(key)
        if kv is None:
            raise GGUFError(path, f"model metadata {arch}.attention.head_count_kv missing")
        if kv.vtype == VT.ARRAY:
            if kv.subtype not in _INT_TYPES:
                raise GGUFError(path, f"{key} has type {_type_str(kv.vtype, kv.subtype)}, expected integers")
            if kv.count != n_layer:
                raise GGUFError(path, f"{key} has {kv.count} entries, block_count is {n_layer}")
            heads = _read_value(f, layout, kv).astype(np.int64).tolist()
        else:
            heads = [int_key(f, key)] * n_layer
    if n_layer < 0 or any(h < 0 for h in heads):
        raise GGUFError(path, f"negative block_count / head_count_kv ({n_layer}, {heads})")
    return arch, n_layer, heads


def read_budgets(path, check_model: bool = True, cross_check: bool = False) -> Optional[TCABudgets]:
    """Read and validate the tca.* keys of a GGUF. None if it has no ``tca.*`` key at all (other
    ``tca.*`` keys without ``tca.version`` raise TCAMetadataError naming ``tca.version``).

    With ``check_model`` the budgets are also checked against the file's own
    ``{arch}.block_count`` / ``{arch}.attention.head_count_kv``. With ``cross_check`` the file is
    also parsed by ``gguf.GGUFReader`` and every tca.* record must agree byte for byte (slow on
    real models: GGUFReader walks the whole token list in Python, ~7 s for Qwen2.5-0.5B).
    Raises TCAMetadataError (naming the key) or GGUFError (unreadable file).
    """
    layout = _scan(path)
    b = _budgets_from(path, layout)
    if b is None:
        return None
    shape = _model_shape(path, layout) if check_model else None
    try:
        if shape is None:
            b.validate()
        else:
            b.validate(model_n_layer=shape[1], model_n_head_kv=shape[2])
    except TCAMetadataError as e:
        e.path = str(path)
        raise
    if cross_check:
        _cross_check(path, layout, [k for k in layout.kv if k.startswith(TCA_PREFIX)])
    return b


def read_model_shape(path):
    """(arch, n_layer, [n_head_kv per layer]) from ``general.architecture``,
    ``{arch}.block_count`` and ``{arch}.attention.head_count_kv`` (scalar or per-layer array;
    falls back to ``head_count`` like llama.cpp)."""
    layout = _scan(path, refuse_huge_tca=False)
    return _model_shape(path, layout)


def list_tca_keys(path) -> list:
    """Names of the tca.* keys in a GGUF (no validation)."""
    layout = _scan(path, refuse_huge_tca=False)
    return [k for k in layout.kv if k.startswith(TCA_PREFIX)]


# --------------------------------------------------------------------------------------------
# copying

def _copy_with_kv(src, dst, extra_items: list, overwrite: bool, verify: bool,
                  expect_budgets: Optional[TCABudgets]) -> None:
    src, dst = Path(src), Path(dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists (pass overwrite=True)")
    check_output_path(dst)  # never replace a device, a FIFO, a directory
    layout = _scan(src, refuse_huge_tca=False)
    keep = [kv for kv in layout.kv.values() if not kv.key.startswith(TCA_PREFIX)]
    new_kv = [(k, _pack_kv(k, t, v, s, layout.bo)) for k, t, v, s in extra_items]

    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=str(dst.parent))
    try:
        os.chmod(tmp, stat.S_IMODE(os.stat(src).st_mode))     # mkstemp makes it 0600
        with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
            hdr = inp.read(24)
            out.write(hdr[:8])                                   # magic + version as in source
            out.write(struct.pack(layout.bo + "QQ", len(layout.tensors), len(keep) + len(new_kv)))
            for kv in keep:                                      # exact source bytes per record
                inp.seek(kv.start)
                out.write(inp.read(kv.end - kv.start))
            for _, rec in new_kv:
                out.write(rec)
            inp.seek(layout.ti_start)                            # tensor infos: unchanged bytes
            out.write(inp.read(layout.ti_end - layout.ti_start))
            pos = out.tell()
            out.write(b"\0" * (-pos % layout.alignment))
            # data section: relative offsets unchanged -> stream [data_offset, EOF) verbatim
            if layout.data_offset < layout.size:
                inp.seek(layout.data_offset)
                buf = bytearray(_COPY_CHUNK)
                view = memoryview(buf)
                while True:
                    n = inp.readinto(buf)
                    if not n:
                        break
                    out.write(view[:n])
            out.flush()
            os.fsync(out.fileno())
        if verify:
            _verify_copy(src, layout, tmp, new_kv, expect_budgets)
        os.replace(tmp, dst)
        tmp = None
        try:
            dfd = os.open(str(dst.parent), os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def _verify_copy(src, src_layout: _Layout, tmp, new_records: list, expect: Optional[TCABudgets]) -> None:
    """Re-read the copy with gguf.GGUFReader and compare it with the source: every non-tca KV
    record (order, type, exact bytes), the new tca.* records, tensor infos and tensor bytes."""
    def fail(msg):
        raise GGUFError(tmp, f"verification of the copy failed: {msg}")

    dst_layout = _scan(tmp)
    reader = _open_reader(tmp)
    keep = [k for k in src_layout.kv if not k.startswith(TCA_PREFIX)]
    names = [n for n in reader.fields if not n.startswith("GGUF.")]
    if names != keep + [k for k, _ in new_records] or list(dst_layout.kv) != names:
        fail("KV keys or their order differ")
    expected_bytes = dict(new_records)
    with open(src, "rb") as fs:
        for name in names:
            field = reader.fields[name]
            got = b"".join(p.tobytes() for p in field.parts)
            if name in expected_bytes:
                want, want_type = expected_bytes[name], None
            else:
                kv = src_layout.kv[name]
                fs.seek(kv.start)
                want, want_type = fs.read(kv.end - kv.start), kv.vtype
            if got != want or (want_type is not None and int(field.types[0]) != want_type):
                fail(f"KV {name} differs")
    if len(reader.tensors) != len(src_layout.tensors):
        fail("tensor count changed")
    # tensor bytes: plain chunked reads (a memmap compare would pull both files into RSS)
    buf_a, buf_b = bytearray(_COPY_CHUNK), bytearray(_COPY_CHUNK)
    with open(src, "rb") as fs, open(tmp, "rb") as fd:
        for ts, td in zip(src_layout.tensors, reader.tensors):
            if (ts.name, ts.ggml_type, list(ts.shape), ts.nbytes) != \
               (td.name, int(td.tensor_type), td.shape.tolist(), td.n_bytes):
                fail(f"tensor {ts.name} info changed")
            fs.seek(src_layout.data_offset + ts.offset)
            fd.seek(td.data_offset)
            for o in range(0, ts.nbytes, _COPY_CHUNK):
                n = min(_COPY_CHUNK, ts.nbytes - o)
                va, vb = memoryview(buf_a)[:n], memoryview(buf_b)[:n]
                if fs.readinto(va) != n or fd.readinto(vb) != n or va != vb:
                    fail(f"data of tensor {ts.name} changed (at byte {o})")
    if (src_layout.size - src_layout.data_offset) != (dst_layout.size - dst_layout.data_offset):
        fail("data section size changed")
    del reader
    if expect is not None and read_budgets(tmp) != expect:
        fail("tca.* keys do not read back equal")


def write_calibrated(src, dst, budgets: TCABudgets, overwrite: bool = False, verify: bool = True) -> None:
    """Copy the GGUF ``src`` to ``dst`` with the tca.* keys set to ``budgets``.

    Existing tca.* keys are dropped; every other KV record (exact bytes, order) and the tensor
    data (streamed, never loaded whole) are kept. Budgets are validated against the model's
    shape first; the copy is written to a temp file, verified with GGUFReader, then renamed.
    """
    _, n_layer, heads = read_model_shape(src)
    budgets.validate(model_n_layer=n_layer, model_n_head_kv=heads)
    _copy_with_kv(src, dst, tca_kv_items(budgets), overwrite, verify, budgets)


def strip(src, dst, overwrite: bool = False, verify: bool = True) -> None:
    """Copy the GGUF ``src`` to ``dst`` without any tca.* key (streamed, verified)."""
    _copy_with_kv(src, dst, [], overwrite, verify, None)


# --------------------------------------------------------------------------------------------
# grid + random budgets (tests, examples)

def log_gaussian_grid(block_size: int, n_candidates: int = 14, sigma: float = 1.0):
    """The candidate grid of design.md section 4 (`calibration.candidate_grid`, the one
    definition) with its budgets: returns (k_values u32[K], mu f32[M], sigma f32[M],
    P f32[M, K] with rows summing to 1, P[c] = reference.log_gaussian_p(k, mu[c], sigma[c]))."""
    from .calibration import candidate_grid
    from .reference import log_gaussian_p
    mu, sig, k = candidate_grid(block_size, n_candidates, sigma)
    P = np.stack([log_gaussian_p(k, m_, s_) for m_, s_ in zip(mu, sig)])
    return k, mu, sig, P.astype(np.float32)


def make_random_budgets(n_layer: int, n_head_kv: Union[int, Sequence[int]], block_size: int = 128,
                        window: int = 4096, seed: int = 0, dense_fraction: float = 0.15,
                        tau: float = 0.95, alpha: float = 0.5, n_sink: int = 4) -> TCABudgets:
    """Valid random budgets on the log-Gaussian grid (some heads dense), for tests."""
    rng = np.random.default_rng(seed)
    heads = [int(n_head_kv)] * n_layer if np.isscalar(n_head_kv) else [int(h) for h in n_head_kv]
    H = sum(heads)
    k, mu, sig, P = log_gaussian_grid(block_size)
    M, K = P.shape
    cand = rng.integers(0, M, size=H).astype(np.int32)
    cand[rng.random(H) < dense_fraction] = -1
    p = np.zeros((H, K), dtype=np.float32)
    for h in range(H):
        if cand[h] < 0:
            p[h, -1] = 1.0
        else:
            p[h] = P[cand[h]]
    density = (p.astype(np.float64) @ k.astype(np.float64)) / block_size
    coverage = np.where(cand < 0, 1.0, rng.uniform(tau, 1.0, size=H)).astype(np.float32)
    text_name = f"random-{seed}"
    import hashlib
    return TCABudgets(
        block_size=block_size, window=window, tau=tau, alpha=alpha, k_values=k,
        grid_mu=mu, grid_sigma=sig, n_layer=n_layer, n_head_kv=heads, candidate=cand, p=p,
        density=density.astype(np.float32), coverage=coverage, calib_text_name=text_name,
        calib_text_sha256=hashlib.sha256(text_name.encode("utf-8")).hexdigest(),
        calib_n_tokens=4096, n_sink=n_sink)
