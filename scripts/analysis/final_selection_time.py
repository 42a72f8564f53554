"""Time the hold retention's final selection on the CPU: a prompt of N tokens (one _decode call,
logits for the last token), then single-token decode steps; the first step carries the final
selection (docs/benchmarks.md "session 11", "session 12"). Each arm runs in its own process (the
TCA_GGML_* knobs are read when a context is created), alternating, so both see the same machine.

  python scripts/analysis/final_selection_time.py -m models/qwen0.5b.final16k.tca.gguf -n 8192 \
      --density 0.25 --arm one=TCA_GGML_SCORE_PER_QUERY=0 --arm per_query=TCA_GGML_SCORE_PER_QUERY=1
"""
import argparse
import json
import os
import subprocess
import sys
import time


def child(a):
    from tca_ggml import Llama, texts
    kw = dict(n_ctx=a.n + 64, n_batch=512, n_ubatch=512, n_threads=a.threads, verbose=False, tca=True)
    if a.density:
        kw["tca_density"] = a.density
    with Llama(a.model, **kw) as llm:
        toks = llm.tokenize(texts.haystack(a.n * 6).encode(), add_bos=True)[: a.n]
        t0 = time.perf_counter()
        llm._decode(toks, 0, want_last_logits=True)
        ttft = time.perf_counter() - t0
        steps = []
        for i in range(a.steps):
            t0 = time.perf_counter()
            llm._decode([toks[-1 - i]], a.n + i, want_last_logits=True)
            steps.append(time.perf_counter() - t0)
        st = llm.tca_stats()
    print(json.dumps({"ttft": ttft, "steps": steps, "n_final": st["n_final"], "rows_kept": st["rows_kept"]}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("-n", type=int, default=8192)
    ap.add_argument("--density", type=float, default=0.0, help="forced density (0: the GGUF's budgets)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--arm", action="append", default=[], help="NAME=VAR=VALUE[,VAR=VALUE]")
    ap.add_argument("--child", action="store_true")
    a = ap.parse_args()
    if a.child:
        return child(a)
    arms = [(x.split("=", 1)[0], dict(kv.split("=", 1) for kv in x.split("=", 1)[1].split(","))) for x in a.arm] or [("default", {})]
    base = [sys.executable, __file__, "--child", "-m", a.model, "-n", str(a.n), "--density", str(a.density),
            "--threads", str(a.threads), "--steps", str(a.steps)]
    for rep in range(a.reps):
        for name, env in arms:
            out = subprocess.run(base, env=dict(os.environ, **env), capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(f"{name:12s} rep {rep}: prompt {r['ttft']:7.2f} s  first step {r['steps'][0]:6.3f} s  "
                  f"next {', '.join(f'{s:.3f}' for s in r['steps'][1:])}  n_final {r['n_final']}  kept {r['rows_kept']}",
                  flush=True)


if __name__ == "__main__":
    main()
