"""On-disk cache of the dense arm of `tca-ggml eval`.

The dense arm (upstream attention, greedy) is a function of: the model's weights and non-TCA
metadata, the prompt tokens, the context settings that change the numbers (n_ctx, n_batch,
n_ubatch, flash attention, seed), the job (max tokens, KL positions, the second question of a
two-turn job) and the build of the dense path. It does not depend on the thread count.

- Model identity: sha256 over the GGUF's key/value records except `tca.*`, its tensor infos and
  its tensor data, so a calibrated copy (which only adds `tca.*` keys) shares the dense cache of
  its base model, and recalibrating does not invalidate it. Memoised per (path, size, mtime).
- Build identity: the package version, the native library's tca_version() and the pinned
  upstream (tca_upstream_version()). The dense path is upstream's graph (checked greedy-identical
  to upstream's llama-simple by tests/test_upstream_equality.py), so rebuilding the library for a
  change of the TCA path keeps the cache. `strict=True` (--cache-strict) adds the sha256 of the
  native library itself: any rebuild invalidates.

Layout: <dir>/dense/<2 hex>/<64 hex>.json (+ .npy for logits), written atomically; the JSON holds
the key's payload too, so an entry can be checked by hand. Default <dir>: $TCA_GGML_EVAL_CACHE, else
<repo>/.cache/eval in a checkout (git-ignored), else ~/.cache/tca_ggml/eval.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np

from .._fsutil import replace_when_done
from ..digest import sha256_file

CACHE_VERSION = 1


def default_dir() -> Path:
    env = os.environ.get("TCA_GGML_EVAL_CACHE")
    if env:
        return Path(env)
    from ..models import models_dir
    md = models_dir()
    if md.name == "models" and (md.parent / "pyproject.toml").exists():
        return md.parent / ".cache" / "eval"
    return Path.home() / ".cache" / "tca_ggml" / "eval"


def seed_dirs() -> list:
    """Read-only caches consulted after the writable one: in a checkout, docs/eval-cache, where the
    dense answers behind docs/benchmarks.md's tables are committed (small JSON records, no logits),
    so that a fresh clone pays only for the TCA arm (the key still holds the model's sha256 and the
    build's versions: a changed model or build misses)."""
    from ..models import models_dir
    md = models_dir()
    d = md.parent / "docs" / "eval-cache"
    return [d] if md.name == "models" and (md.parent / "pyproject.toml").exists() and d.is_dir() else []


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=str(path.parent))
    with replace_when_done(tmp, path):
        with os.fdopen(fd, "wb") as f:
            f.write(data)


def model_dense_id(path: str, memo_dir: Optional[Path] = None) -> str:
    """sha256 of everything in the GGUF that the dense arm reads (all but tca.* keys)."""
    from ..gguf_meta import _scan
    st = os.stat(path)
    real = os.path.realpath(path)
    memo_file = (memo_dir / "models.json") if memo_dir is not None else None
    memo: Dict[str, Any] = {}
    if memo_file is not None and memo_file.exists():
        try:
            memo = json.loads(memo_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            memo = {}
    m = memo.get(real)
    if m and m.get("size") == st.st_size and m.get("mtime_ns") == st.st_mtime_ns:
        return m["id"]
    lay = _scan(path, refuse_huge_tca=False)
    h = hashlib.sha256(b"tca_ggml dense model id v1\0")
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            h.update(mm[:16])  # magic, version, n_tensors (not n_kv: a calibrated copy has more keys)
            for k, kv in lay.kv.items():
                if k.startswith("tca."):
                    continue
                h.update(mm[kv.start:kv.end])
            h.update(mm[lay.ti_start:lay.ti_end])
            off = lay.data_offset
            step = 1 << 24
            while off < lay.size:
                h.update(mm[off:min(off + step, lay.size)])
                off += step
        finally:
            mm.close()
    mid = h.hexdigest()
    if memo_file is not None:
        memo[real] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "id": mid}
        try:
            _atomic_write(memo_file, json.dumps(memo, indent=1).encode())
        except OSError:
            pass
    return mid


def build_id(strict: bool = False) -> Dict[str, str]:
    from .. import __version__, _native
    L = _native.lib()
    b = {"tca_ggml": __version__,
         "native": _native.ffi.string(L.tca_version()).decode(),
         "upstream": _native.ffi.string(L.tca_upstream_version()).decode()}
    if strict:
        b["library_sha256"] = sha256_file(_native._lib_path)
    return b


def tokens_digest(tokens) -> str:
    return hashlib.sha256(np.asarray(tokens, dtype=np.int32).tobytes()).hexdigest()


class DenseCache:
    """get/put of dense-arm results by a JSON-able key payload."""

    def __init__(self, root: Optional[Path], model_path: str, *, enabled: bool = True, strict: bool = False):
        self.enabled = bool(enabled)
        self.root = Path(root) if root is not None else default_dir()
        self.seeds = seed_dirs() if root is None else []   # a cache dir given (--cache-dir): that alone
        self.hits = 0
        self.misses = 0
        self.writes = 0
        self.model_id = model_dense_id(model_path, self.root if self.enabled else None) if enabled else None
        self.build = build_id(strict) if enabled else None
        self.strict = strict

    def key(self, payload: Dict[str, Any]) -> Tuple[str, Dict[str, Any]]:
        full = {"cache_version": CACHE_VERSION, "model": self.model_id, "build": self.build, **payload}
        s = json.dumps(full, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(s.encode()).hexdigest(), full

    def _path(self, k: str) -> Path:
        return self.root / "dense" / k[:2] / f"{k}.json"

    def get(self, payload: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        if not self.enabled:
            return None
        k, full = self.key(payload)
        for p in [self._path(k)] + ([s / "dense" / k[:2] / f"{k}.json" for s in self.seeds]):
            try:
                rec = json.loads(p.read_text(encoding="utf-8"))
                if rec.get("key") != full:
                    raise ValueError("key mismatch")
                res = rec["result"]
                if rec.get("arrays"):
                    for name in rec["arrays"]:
                        res[name] = np.load(p.with_name(f"{k}.{name}.npy"), allow_pickle=False)
            except (OSError, ValueError, KeyError):
                continue
            self.hits += 1
            return res
        self.misses += 1
        return None

    def put(self, payload: Dict[str, Any], result: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        k, full = self.key(payload)
        p = self._path(k)
        plain, arrays = {}, []
        for name, v in result.items():
            if isinstance(v, np.ndarray):
                import io
                buf = io.BytesIO()
                np.save(buf, v, allow_pickle=False)
                _atomic_write(p.with_name(f"{k}.{name}.npy"), buf.getvalue())
                arrays.append(name)
            else:
                plain[name] = v
        _atomic_write(p, json.dumps({"key": full, "result": plain, "arrays": arrays}, ensure_ascii=False,
                                    indent=1).encode("utf-8"))
        self.writes += 1

    def summary(self) -> Dict[str, Any]:
        return {"enabled": self.enabled, "dir": str(self.root), "strict": self.strict, "hits": self.hits,
                "misses": self.misses, "writes": self.writes, "model_dense_id": self.model_id,
                "build": self.build}
