"""How much dense attention mass do prefill queries put beyond the window, and how concentrated is it?

For one RULER prompt (RULER's own generator, as `tca-ggml eval` builds it), a dense pass captures the
post-RoPE Q/K of every layer (tca_ggml.calibrate.capture_qk); for a sample of queries more than
`window` tokens into the prompt, per layer (mean over query heads and sampled queries):
  far    = softmax mass on rows older than the window (sinks excluded) - what a window-only prefill drops
  top10  = share of that far mass held by the top 10% of far rows (1.0: concentrated, ~0.1: diffuse)
  top10q = the same for the top 10% chosen by the *previous ubatch's last query* (the sparse prefill's rule)
Usage: python scripts/analysis/prefill_far_mass.py MODEL TASK LENGTH [--window 4096] [--ubatch 512]
"""
import argparse

import numpy as np

from tca_ggml.calibrate import capture_qk
from tca_ggml.evaluate import _Builder
from tca_ggml.llama import Llama

ap = argparse.ArgumentParser()
ap.add_argument("model"); ap.add_argument("task"); ap.add_argument("length", type=int)
ap.add_argument("--window", type=int, default=4096); ap.add_argument("--ubatch", type=int, default=512)
ap.add_argument("--every", type=int, default=64); ap.add_argument("--threads", type=int, default=1)
a = ap.parse_args()
with Llama(a.model, vocab_only=True, verbose=False) as tok:
    job = _Builder(tok, 0).ruler_jobs(a.task, a.length, 1)[0]
toks = list(job.tokens)
cap = capture_qk(a.model, toks, n_threads=a.threads, n_batch=a.ubatch, progress=False)
n, W, S = len(toks), a.window, 4
print(f"{a.task} {a.length}: {n} tokens, window {W}, queries every {a.every} from {W + a.ubatch}")
print("| layer | far mass | top 10% of far rows (ideal) | top 10% by the previous ubatch's last query |")
print("|---:|---:|---:|---:|")
for il, (Q, K) in enumerate(zip(cap.Q, cap.K)):
    Q = Q.astype(np.float32); K = K.astype(np.float32)
    nh, nkv, d = Q.shape[1], K.shape[1], Q.shape[2]
    grp = nh // nkv
    sc = 1.0 / np.sqrt(d)
    far_l, top_l, topq_l = [], [], []
    for p in range(W + a.ubatch, n, a.every):
        lim = p - W                        # rows [S, lim) are beyond the window
        if lim <= S + 10: continue
        ub0 = (p // a.ubatch) * a.ubatch   # the previous ubatch's last query selects
        qsel = ub0 - 1
        for h in range(nh):
            g = h // grp
            s = K[: p + 1, g] @ Q[p, h] * sc
            w = np.exp(s - s.max()); w /= w.sum()
            far = w[S:lim]
            fm = far.sum()
            k = max(1, len(far) // 10)
            ideal = np.sort(far)[-k:].sum()
            s2 = K[: qsel + 1, g] @ Q[qsel, h] * sc
            pick = np.argsort(s2[S:lim])[-k:]
            far_l.append(fm); top_l.append(ideal / max(fm, 1e-12)); topq_l.append(far[pick].sum() / max(fm, 1e-12))
    print(f"| {il} | {np.mean(far_l):.3f} | {np.mean(top_l):.2f} | {np.mean(topq_l):.2f} |")
