#!/usr/bin/env python3
"""Time GGML_OP_TCA_ATTN on the CPU backend (not a test), optionally vs upstream's
ggml_flash_attn_ext on the same shapes (dense: every query sees every row).

    TCA_GGML_LIB=build/op/libtca_ggml.so python3 native/bench_tca_attn.py [--fa]
    TCA_GGML_LIB=build/cuda/libtca_ggml.so python3 native/bench_tca_attn.py --backend CUDA0 --fa

The entry points are the test library's (libtca_ggml_test.so beside the libtca_ggml.so the package
loads, or TCA_GGML_TEST_LIB; declared in native/tests/tca_test_ops.h).

With --backend the graph runs on that ggml backend (tca_test_bench_attn_backend): each compute
holds --ops copies of the op (launch/sync overhead amortised) and the time is per op; K/V stay
resident, so small K/V partly hit the GPU's L2 (both ops alike).

Defaults: d=64, n_head=14, n_head_kv=2, 512 queries over 8192 rows per KV head, f16 K/V,
2 threads. Prints milliseconds per graph compute (best of --reps after a warm-up), wall
time, or with --cpu-time the process CPU time (use --threads 1 then: on a shared machine
wall time with 2 threads is dominated by whoever else holds a core).

--curve (with --backend): the kernel-level forced-density curve. For each context length n_ctx
in --ctx, upstream ggml_flash_attn_ext over all n_ctx rows per KV head vs ggml_tca_attn over the
rows TCA would keep at each forced density p in --densities, kept = w + p*(n_ctx - w) rows per
KV head (w = --window), for a prefill ubatch of --ubatch queries placed after the context and
for one decode query. Random inputs; every query sees every row (both ops alike). Prints one
markdown table (ms per op, speedup vs flash_attn_ext) and, with --json, the raw numbers.

    python3 native/bench_tca_attn.py --backend CUDA0 --curve --d 128 --n-head 32 --n-head-kv 8
"""
import argparse
import json
import os
import time
from pathlib import Path

from tca_ggml import _native

TYPES = {"f32": 0, "f16": 1, "q8_0": 8}
HEADER = Path(__file__).resolve().parent / "tests" / "tca_test_ops.h"


def lib_path() -> Path:
    env = os.environ.get("TCA_GGML_TEST_LIB")
    return Path(env) if env else _native.library_path().with_name("libtca_ggml_test.so")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--n-head", type=int, default=14)
    ap.add_argument("--n-head-kv", type=int, default=2)
    ap.add_argument("--n-tokens", type=int, default=512)
    ap.add_argument("--n-kv", type=int, default=8192, help="rows per KV head")
    ap.add_argument("--type", choices=list(TYPES), default="f16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--fa", action="store_true", help="also time ggml_flash_attn_ext")
    ap.add_argument("--backend", default=None, help="ggml backend name (CUDA0, CPU, ...); default: CPU as before")
    ap.add_argument("--ops", type=int, default=20, help="op copies per graph with --backend")
    ap.add_argument("--cpu-time", action="store_true",
                    help="process CPU time instead of wall time (use with --threads 1 on a loaded machine)")
    ap.add_argument("--curve", action="store_true", help="forced-density curve (needs --backend), see above")
    ap.add_argument("--ctx", default="32768,65536,131072", help="--curve: context lengths")
    ap.add_argument("--densities", default="1.0,0.39,0.2,0.1", help="--curve: forced densities")
    ap.add_argument("--window", type=int, default=4096, help="--curve: exact window w (rows always kept)")
    ap.add_argument("--ubatch", type=int, default=2048, help="--curve: queries of the prefill ubatch")
    ap.add_argument("--prefill-ops", type=int, default=3, help="--curve: op copies per graph, prefill")
    ap.add_argument("--decode-ops", type=int, default=50, help="--curve: op copies per graph, decode")
    ap.add_argument("--json", default=None, help="--curve: also write the numbers here")
    a = ap.parse_args()
    ffi, lib = _native.open_library(lib_path(), HEADER)
    if a.curve:
        if not a.backend:
            raise SystemExit("--curve needs --backend")
        return curve(a, lib)
    shape = (a.d, a.n_head, a.n_head_kv, a.n_tokens, a.n_kv, TYPES[a.type], a.threads, a.reps, int(a.cpu_time))
    flops = 4.0 * a.d * a.n_head * a.n_tokens * a.n_kv
    for which, name in ((0, "ggml_tca_attn"), (1, "ggml_flash_attn_ext")):
        if which == 1 and not a.fa:
            continue
        if a.backend:
            t = lib.tca_test_bench_attn_backend(a.backend.encode(), which, *shape[:-1], a.ops)
        else:
            t = lib.tca_test_bench_attn(which, *shape)
        if t < 0:
            raise SystemExit(f"{name}: error {t}")
        print(f"{name:20s} d={a.d} n_head={a.n_head} n_head_kv={a.n_head_kv} n_tokens={a.n_tokens} "
              f"n_kv={a.n_kv} {a.type} {a.backend or f'threads={a.threads}'}: {t * 1e3:8.3f} ms "
              f"{'cpu' if a.cpu_time else 'wall'} "
              f"({flops / t / 1e9:.1f} GFLOP/s)")
    return 0


def curve(a, lib) -> int:
    ctxs = [int(x) for x in a.ctx.split(",")]
    dens = [float(x) for x in a.densities.split(",")]
    row_bytes = {"f32": 4.0 * a.d, "f16": 2.0 * a.d, "q8_0": 34.0 * a.d / 32}[a.type]
    res = []

    def one(which, n_tokens, n_kv, ops):
        t0 = time.time()
        t = lib.tca_test_bench_attn_backend(a.backend.encode(), which, a.d, a.n_head, a.n_head_kv, n_tokens,
                                            n_kv, TYPES[a.type], a.threads, a.reps, ops)
        name = ("ggml_tca_attn", "ggml_flash_attn_ext")[which]
        if t < 0:
            raise SystemExit(f"{name} n_tokens={n_tokens} n_kv={n_kv}: error {t}")
        flops = 4.0 * a.d * a.n_head * n_tokens * n_kv
        kv_mb = 2 * row_bytes * n_kv * a.n_head_kv / 2**20
        print(f"  {name:20s} d={a.d} {a.n_head}/{a.n_head_kv} n_tokens={n_tokens:5d} n_kv={n_kv:6d} {a.type}: "
              f"{t * 1e3:9.4f} ms/op  {flops / t / 1e12:7.2f} TFLOP/s  {kv_mb * 2**20 / t / 1e9:7.1f} GB/s(K+V "
              f"{kv_mb:.0f} MiB)  [call {time.time() - t0:.1f} s]", flush=True)
        return t

    for n_ctx in ctxs:
        for mode, n_tokens, ops in (("prefill", a.ubatch, a.prefill_ops), ("decode", 1, a.decode_ops)):
            r = {"n_ctx": n_ctx, "mode": mode, "n_tokens": n_tokens, "fa_ms": one(1, n_tokens, n_ctx, ops) * 1e3,
                 "tca": []}
            for p in dens:
                kept = min(n_ctx, a.window + round(p * (n_ctx - a.window)))
                t = one(0, n_tokens, kept, ops) * 1e3
                r["tca"].append({"density": p, "kept": kept, "ms": t, "speedup": r["fa_ms"] / t,
                                 "kv_mib": 2 * row_bytes * kept * a.n_head_kv / 2**20})
            res.append(r)
            if a.json:
                with open(a.json, "w") as f:
                    json.dump({"d": a.d, "n_head": a.n_head, "n_head_kv": a.n_head_kv, "type": a.type,
                               "window": a.window, "backend": a.backend, "reps": a.reps, "rows": res}, f, indent=1)

    print(f"\nd={a.d}, {a.n_head}/{a.n_head_kv} heads, {a.type} K/V, {a.backend}; ms per op (speedup vs "
          f"flash_attn_ext); kept rows per KV head = {a.window} + p*(n_ctx - {a.window})")
    print("| n_ctx | step | flash_attn_ext (n_ctx rows) | " +
          " | ".join(f"tca p={p:g}" for p in dens) + " |")
    print("|---|---|---|" + "---|" * len(dens))
    for r in res:
        # decode: K+V that fit the H100's 50 MiB L2 stay resident over the --ops copies (flattering)
        cells = [f"{x['ms']:.3f} ({x['speedup']:.2f}x)" + ("†" if r["mode"] == "decode" and x["kv_mib"] <= 50 else "")
                 for x in r["tca"]]
        step = f"prefill {r['n_tokens']} q" if r["mode"] == "prefill" else "decode 1 q"
        print(f"| {r['n_ctx'] / 1024:g}K | {step} | {r['fa_ms']:.3f} | " + " | ".join(cells) + " |")
    print("kept rows: " + "; ".join(f"{r['n_ctx'] / 1024:g}K: " + ", ".join(str(x["kept"]) for x in r["tca"])
                                    for r in res if r["mode"] == "decode"))
    print("† decode with kept K+V <= 50 MiB: can stay in the GPU's L2 across the op copies", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
