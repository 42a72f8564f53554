#!/usr/bin/env python3
"""Obtain the pinned upstream llama.cpp source tree, verified and patched.

Upstream is never committed to this repository. It comes, at build time, from the
``llama-cpp-python`` sdist on PyPI (which vendors ggml-org/llama.cpp), fetched by
package name with pip, checked against a pinned sha256, extracted, and patched with
the small, named patches in ``native/patches/`` (applied in file-name order).

Usage::

    python native/upstream.py prepare            # prints the prepared source dir
    python native/upstream.py prepare --dest DIR

Environment:
    TCA_GGML_CACHE      cache directory (default: <repo>/.cache)
    TCA_GGML_SDIST      path to an already downloaded sdist (still sha256-checked)

Upgrading upstream = change the three PIN_* constants and rebase the patches.
Only the standard library is used: this runs inside CMake's configure step.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

PIN_PACKAGE = "llama-cpp-python"
PIN_VERSION = "0.3.36"
PIN_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
PIN_LLAMA_CPP = "b11312 (0c1e57098)"  # what the sdist vendors, for humans and logs

REPO = Path(__file__).resolve().parent.parent
PATCH_DIR = REPO / "native" / "patches"
SDIST_NAME = f"llama_cpp_python-{PIN_VERSION}.tar.gz"
VENDOR_PREFIX = f"llama_cpp_python-{PIN_VERSION}/vendor/llama.cpp/"


def log(msg: str) -> None:
    print(f"[tca_ggml upstream] {msg}", file=sys.stderr, flush=True)


def _package_digest():
    # the package's sha256 helper, by path: this script runs before tca_ggml is installed
    spec = importlib.util.spec_from_file_location("_tca_ggml_digest", REPO / "python" / "tca_ggml" / "digest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.sha256_file


sha256_file = _package_digest()


def cache_dir() -> Path:
    return Path(os.environ.get("TCA_GGML_CACHE", REPO / ".cache")).resolve()


def fetch_sdist() -> Path:
    env_path = os.environ.get("TCA_GGML_SDIST")
    if env_path:
        sdist = Path(env_path)
    else:
        dl = cache_dir() / "sdist"
        dl.mkdir(parents=True, exist_ok=True)
        sdist = dl / SDIST_NAME
        if not sdist.exists() or sha256_file(sdist) != PIN_SHA256:
            log(f"downloading {PIN_PACKAGE}=={PIN_VERSION} sdist from PyPI (pip, by name)")
            # --no-build-isolation: pip would otherwise build the sdist's build
            # requirements (cmake itself) from source just to read its metadata.
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                   "--no-build-isolation", "--disable-pip-version-check", "-q",
                   f"{PIN_PACKAGE}=={PIN_VERSION}", "-d", str(dl)]
            r = subprocess.run(cmd)
            if r.returncode != 0 or not sdist.exists():
                raise SystemExit(f"error: could not download {PIN_PACKAGE}=={PIN_VERSION} "
                                 f"(pip exit {r.returncode}); set TCA_GGML_SDIST to a local copy")
    got = sha256_file(sdist)
    if got != PIN_SHA256:
        raise SystemExit(f"error: sha256 mismatch for {sdist}: got {got}, pinned {PIN_SHA256}")
    return sdist


def patches() -> list[Path]:
    return sorted(PATCH_DIR.glob("*.patch"))


def patch_fingerprint() -> str:
    h = hashlib.sha256(PIN_SHA256.encode())
    for p in patches():
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _sync_tree(src: Path, dst: Path) -> int:
    """Make dst identical to src, rewriting only files whose bytes differ.

    Unchanged files keep their mtimes, so a patch edit rebuilds only what it touches."""
    changed = 0
    want = set()
    for f in src.rglob("*"):
        rel = f.relative_to(src)
        want.add(rel)
        d = dst / rel
        if f.is_dir():
            d.mkdir(parents=True, exist_ok=True)
            continue
        if d.is_file() and d.stat().st_size == f.stat().st_size and d.read_bytes() == f.read_bytes():
            continue
        d.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, d)
        os.utime(d)  # newer than any object built from the old content
        changed += 1
    for d in sorted(dst.rglob("*"), reverse=True):
        if d.relative_to(dst) not in want:
            (shutil.rmtree if d.is_dir() else os.unlink)(d)
            changed += 1
    return changed


def extract_pristine(sdist: Path, out: Path) -> None:
    with tarfile.open(sdist, "r:gz") as tf:
        members = []
        for m in tf.getmembers():
            if not m.name.startswith(VENDOR_PREFIX):
                continue
            m.name = m.name[len(VENDOR_PREFIX):]
            if not m.name or m.name.startswith("/") or ".." in Path(m.name).parts:
                continue
            if not (m.isfile() or m.isdir()):
                continue
            members.append(m)
        tf.extractall(out, members=members)


def prepare(dest: Path | None) -> Path:
    fp = patch_fingerprint()
    if dest is None:
        dest = cache_dir() / f"llama.cpp-{PIN_VERSION}"
    stamp = dest / ".tca_ggml_stamp"
    if stamp.exists() and stamp.read_text().strip() == fp:
        return dest
    sdist = fetch_sdist()
    tmp = dest.with_name(dest.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    log(f"extracting vendor/llama.cpp {PIN_LLAMA_CPP}")
    extract_pristine(sdist, tmp)
    for p in patches():
        log(f"applying {p.name}")
        r = subprocess.run(["patch", "-p1", "--forward", "--batch", "-s", "-d", str(tmp), "-i", str(p)])
        if r.returncode != 0:
            raise SystemExit(f"error: patch {p.name} does not apply to llama.cpp {PIN_LLAMA_CPP}")
    for junk in list(tmp.rglob("*.orig")) + list(tmp.rglob("*.rej")):
        junk.unlink()
    (tmp / ".tca_ggml_stamp").write_text(fp + "\n")
    dest.mkdir(parents=True, exist_ok=True)
    n = _sync_tree(tmp, dest)
    shutil.rmtree(tmp)
    log(f"{dest}: {n} files updated")
    return dest


def pristine() -> Path:
    """An unpatched copy, for writing patches: diff -ruN pristine/ work/."""
    out = cache_dir() / f"llama.cpp-{PIN_VERSION}-pristine"
    if not (out / "CMakeLists.txt").exists():
        extract_pristine(fetch_sdist(), out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="download, verify, extract and patch; print the source dir")
    p.add_argument("--dest", type=Path, default=None)
    sub.add_parser("info", help="print the pin")
    sub.add_parser("pristine", help="extract an unpatched copy (for making patches); print its dir")
    a = ap.parse_args(argv)
    if a.cmd == "info":
        print(f"{PIN_PACKAGE}=={PIN_VERSION} sha256={PIN_SHA256} llama.cpp {PIN_LLAMA_CPP}")
        return 0
    if a.cmd == "pristine":
        print(pristine())
        return 0
    print(prepare(a.dest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
