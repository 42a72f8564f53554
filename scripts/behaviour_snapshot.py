#!/usr/bin/env python3
"""Behaviour snapshot of TCA configurations, for refactors that must not change behaviour.

For the default model and a ~3000-token haystack prompt, records per configuration (dense, a
forced density, the calibrated budgets): the last prompt token's logits (argmax, top-5, rounded
sums), the greedy continuation (16 tokens, temperature 0) and the kept positions of every
(layer, KV head) after the prompt and after the continuation, plus tca_stats() counters.

    python scripts/behaviour_snapshot.py -o /tmp/before.json
    python scripts/behaviour_snapshot.py -o /tmp/after.json --compare /tmp/before.json

--compare exits 1 unless kept rows and greedy tokens are identical and logits equal to 1e-5
(relative). Timings are recorded for information only (never compared).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

from tca_ggml import Llama, texts

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "models" / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
CALIBRATED = ROOT / "models" / "qwen0.5b.final16k.tca.gguf"
N_PROMPT = 3000
N_GEN = 16


def configs():
    return [
        ("dense", DEFAULT_MODEL, dict(tca=False)),
        ("forced_0.25", DEFAULT_MODEL, dict(tca=True, tca_density=0.25, tca_window=512, tca_block=64)),
        # the calibrated window is forced to 512 so that compaction happens at n_ctx 4096
        ("calibrated", CALIBRATED, dict(tca=True, tca_window=512)),
    ]


def kept(llm):
    st = llm.tca_stats()
    if not st["active"]:
        return None, None
    pos = {}
    for layer, head in zip(st["layer"].tolist(), st["kv_head"].tolist()):
        p = llm.tca_retained_positions(layer, head)
        pos[f"{layer}.{head}"] = p.tolist()
    summary = {k: st[k] for k in ("n_seen", "frontier", "rows_kept", "rows_cap", "n_compactions", "bytes_alloc",
                                  "bytes_dense", "bytes_hold", "rows_held", "n_final", "retention", "label")}
    summary["retained"] = st["retained"].tolist()
    summary["capacity"] = st["capacity"].tolist()
    summary["coverage"] = [round(float(c), 5) for c in st["coverage"]]
    return pos, summary


def run_one(name, model, kw, threads):
    with Llama(str(model), n_ctx=4096, n_batch=512, n_ubatch=512, n_threads=threads, verbose=False, **kw) as llm:
        text = texts.haystack(20000)
        toks = llm.tokenize(text)[:N_PROMPT]
        t0 = time.perf_counter()
        logits = llm.eval_logits(toks)
        t_prefill = time.perf_counter() - t0
        pos_prompt, st_prompt = kept(llm)
        top5 = np.argsort(-logits)[:5]
        out = {
            "n_prompt": len(toks), "prompt_sha": hashlib.sha256(np.asarray(toks, np.int32).tobytes()).hexdigest(),
            "label": llm.tca_label,
            "resolved": {k: getattr(getattr(llm, "_tp", None), k, None) for k in ("block", "window", "n_sink")},
            "argmax": int(np.argmax(logits)), "top5": top5.tolist(), "top5_logits": [float(logits[i]) for i in top5],
            "logits_sum": float(np.sum(logits, dtype=np.float64)), "logits_abs_sum": float(np.abs(logits).sum(dtype=np.float64)),
            "logits": logits.tolist(),
            "kept_after_prompt": pos_prompt, "stats_after_prompt": st_prompt,
        }
        llm.reset()
        t0 = time.perf_counter()
        gen = list(llm.generate_tokens(toks, N_GEN, temperature=0.0))
        t_total = time.perf_counter() - t0
        out["greedy"] = [int(t) for t in gen]
        out["greedy_text"] = llm.detokenize(gen).decode("utf-8", "replace")
        out["kept_after_gen"], out["stats_after_gen"] = kept(llm)
        out["timing_s"] = {"prefill": t_prefill, "prefill_plus_gen": t_total}
        return out


def compare(a, b):
    bad = []
    for name in a:
        x, y = a[name], b.get(name)
        if y is None:
            bad.append(f"{name}: missing"); continue
        for k in ("n_prompt", "prompt_sha", "argmax", "top5", "greedy", "kept_after_prompt", "kept_after_gen"):
            if x[k] != y[k]:
                bad.append(f"{name}: {k} differs")
        for k in ("stats_after_prompt", "stats_after_gen"):
            sx = {kk: v for kk, v in (x[k] or {}).items() if kk not in ("label",)}
            sy = {kk: v for kk, v in (y[k] or {}).items() if kk not in ("label",)}
            if sx != sy:
                bad.append(f"{name}: {k} differs: " + ", ".join(kk for kk in sx if sx.get(kk) != sy.get(kk)))
        lx, ly = np.asarray(x["logits"]), np.asarray(y["logits"])
        if lx.shape != ly.shape or not np.allclose(lx, ly, rtol=1e-5, atol=1e-5):
            bad.append(f"{name}: logits differ (max |d| {np.max(np.abs(lx - ly)) if lx.shape == ly.shape else 'shape'})")
        else:
            print(f"{name}: identical (max |d logits| = {np.max(np.abs(lx - ly)):.3g}; greedy {x['greedy_text']!r}; "
                  f"timing before {x['timing_s']['prefill_plus_gen']:.2f}s after {y['timing_s']['prefill_plus_gen']:.2f}s)")
    return bad


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--out", required=True)
    ap.add_argument("--compare", help="a previous snapshot: exit 1 unless identical")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    res = {}
    for name, model, kw in configs():
        t0 = time.perf_counter()
        res[name] = run_one(name, model, kw, a.threads)
        print(f"[snapshot] {name}: argmax {res[name]['argmax']} greedy {res[name]['greedy_text']!r} "
              f"({time.perf_counter() - t0:.1f}s)", flush=True)
    Path(a.out).write_text(json.dumps(res))
    if a.compare:
        bad = compare(json.loads(Path(a.compare).read_text()), res)
        for b in bad:
            print("DIFF", b)
        print("SNAPSHOT IDENTICAL" if not bad else "SNAPSHOT DIFFERS")
        return 1 if bad else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
