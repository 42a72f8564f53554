#!/usr/bin/env python3
"""Time GGML_OP_TCA_ATTN on the CPU backend (not a test), optionally vs upstream's
ggml_flash_attn_ext on the same shapes (dense: every query sees every row).

    TCA_GGML_LIB=build/op/libtca_ggml.so python3 native/bench_tca_attn.py [--fa]
    TCA_GGML_LIB=build/cuda/libtca_ggml.so python3 native/bench_tca_attn.py --backend CUDA0 --fa

With --backend the graph runs on that ggml backend (tca_test_bench_attn_backend): each compute
holds --ops copies of the op (launch/sync overhead amortised) and the time is per op; K/V stay
resident, so small K/V partly hit the GPU's L2 (both ops alike).

Defaults: d=64, n_head=14, n_head_kv=2, 512 queries over 8192 rows per KV head, f16 K/V,
2 threads. Prints milliseconds per graph compute (best of --reps after a warm-up), wall
time, or with --cpu-time the process CPU time (use --threads 1 then: on a shared machine
wall time with 2 threads is dominated by whoever else holds a core).
"""
import argparse
import importlib.util
import os
from pathlib import Path

import cffi

TYPES = {"f32": 0, "f16": 1, "q8_0": 8}


def lib_path() -> str:
    env = os.environ.get("TCA_GGML_LIB")
    if env:
        return env
    spec = importlib.util.find_spec("tca_ggml")
    if spec is None:
        raise SystemExit("set TCA_GGML_LIB or install tca_ggml")
    return str(Path(list(spec.submodule_search_locations)[0]) / "lib" / "libtca_ggml.so")


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
    a = ap.parse_args()
    ffi = cffi.FFI()
    ffi.cdef("double tca_test_bench_attn(int which, int d, int n_head, int n_head_kv, int n_tokens, "
             "int n_kv, int kv_type, int n_threads, int reps, int cpu_time);"
             "double tca_test_bench_attn_backend(const char * backend, int which, int d, int n_head, int n_head_kv, "
             "int n_tokens, int n_kv, int kv_type, int n_threads, int reps, int n_ops);")
    lib = ffi.dlopen(lib_path())
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


if __name__ == "__main__":
    raise SystemExit(main())
