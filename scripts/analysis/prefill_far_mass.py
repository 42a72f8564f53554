"""How much dense attention mass do prefill queries put beyond the window, and how concentrated is it?

For one RULER prompt (RULER's own generator, as `tca-ggml eval` builds it), a dense pass captures the
post-RoPE Q/K of every layer (tca_ggml.calibrate.capture_qk); for a sample of queries more than
`window` tokens into the prompt, per layer (mean over query heads and sampled queries):
  far    = softmax mass on rows older than the window (sinks excluded) - what a window-only prefill drops
  top10  = share of that far mass held by the top 10% of far rows (1.0: concentrated, ~0.1: diffuse)
  top10q = the same for the top 10% chosen by the *previous ubatch's last query* (the sparse prefill's rule)
  tileM / tileQ = the share held by the top 10% of far *blocks* (--block rows) chosen per query tile
           (--tile queries, aligned) by the tile's mean query against each block's mean key (M) or
           against Quest's per-channel bound max(q.kmin, q.kmax) (Q): a per-query-block selection
           (MInference / FlexPrefill / Quest) that the attention op could make for itself;
           bideal = the top 10% of far blocks by the query's own mass (what any block choice can reach)
           tileG = tileM with the tile's queries of all the KV head's query heads pooled (one choice a KV head)
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
ap.add_argument("--tile", type=int, default=64); ap.add_argument("--block", type=int, default=128)
ap.add_argument("--share", type=float, default=0.1)
a = ap.parse_args()
with Llama(a.model, vocab_only=True, verbose=False) as tok:
    job = _Builder(tok, 0).ruler_jobs(a.task, a.length, 1)[0]
toks = list(job.tokens)
cap = capture_qk(a.model, toks, n_threads=a.threads, n_batch=a.ubatch, progress=False)
n, W, S = len(toks), a.window, 4
print(f"{a.task} {a.length}: {n} tokens, window {W}, queries every {a.every} from {W + a.ubatch}")
print(f"| layer | far mass | top {a.share:.0%} of far rows (ideal) | by the previous ubatch's last query | "
      f"blocks by tile mean . block mean | blocks by tile mean . Quest bound | blocks by KV head's tile mean . block mean | the query's own best blocks (ideal) |")
print("|---:|---:|---:|---:|---:|---:|---:|---:|")
B = a.block
for il, (Q, K) in enumerate(zip(cap.Q, cap.K)):
    Q = Q.astype(np.float32); K = K.astype(np.float32)
    nh, nkv, d = Q.shape[1], K.shape[1], Q.shape[2]
    grp = nh // nkv
    sc = 1.0 / np.sqrt(d)
    far_l, top_l, topq_l, tm_l, tq_l, tg_l, bi_l = [], [], [], [], [], [], []
    nb_all = n // B
    Kb = K[: nb_all * B].reshape(nb_all, B, nkv, d)
    kmean, kmin, kmax = Kb.mean(1), Kb.min(1), Kb.max(1)   # [nb, nkv, d]
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
            k = max(1, int(len(far) * a.share))
            ideal = np.sort(far)[-k:].sum()
            s2 = K[: qsel + 1, g] @ Q[qsel, h] * sc
            pick = np.argsort(s2[S:lim])[-k:]
            far_l.append(fm); top_l.append(ideal / max(fm, 1e-12)); topq_l.append(far[pick].sum() / max(fm, 1e-12))
            # per query tile: whole blocks [b0, b1) beyond the window (the sink block's rows counted too)
            t0 = (p // a.tile) * a.tile
            qm = Q[t0 : p + 1, h].mean(0)                          # this head's tile
            qg = Q[t0 : p + 1, g * grp : (g + 1) * grp].mean((0, 1))  # the KV head's tile (its query heads)
            nbf = lim // B
            if nbf < 2: continue
            kb = max(1, int(round(nbf * a.share)))
            for est, acc in ((kmean[:nbf, g] @ qm, tm_l), (np.maximum(kmin[:nbf, g] * qm, kmax[:nbf, g] * qm).sum(1), tq_l),
                             (kmean[:nbf, g] @ qg, tg_l),
                             (np.add.reduceat(np.concatenate([np.zeros(S), w[S : nbf * B]]), np.arange(0, nbf * B, B)), bi_l)):
                top_b = np.argsort(est)[-kb:]
                got = sum(w[max(S, b * B) : (b + 1) * B].sum() for b in top_b)
                acc.append(got / max(w[S : nbf * B].sum(), 1e-12))
    print(f"| {il} | {np.mean(far_l):.3f} | {np.mean(top_l):.2f} | {np.mean(topq_l):.2f} | {np.mean(tm_l):.2f} | {np.mean(tq_l):.2f} | {np.mean(tg_l):.2f} | {np.mean(bi_l):.2f} |")
