"""Would Quest-style block recall over the hold tier find a NIAH needle at decode time? (offline)

Measurement only, on real weights: one dense pass (calibrate.capture_qk) over a NIAH prompt of a
cell followed by its answer (the cached dense answer of the cell when docs/eval-cache/dense has it,
else the needle's value), then, for the first answer tokens' queries (what dense decode computes),
per layer and KV head:

  (a) the dense softmax mass on the needle's rows (softmax over every key <= the query, scale
      1/sqrt(d)), per query head and pooled over the GQA group as TCA pools (mean of the group's
      softmax rows); a (layer, kv head, step) "matters" when its pooled needle mass >= --thr;
  (b)/(c) the hold tier outside the local window (prompt rows [0, n_prompt - window)) cut into
      blocks of S rows aligned at multiples of S from row 0; each block scored by Quest's upper
      bound UB = sum_c max(q_c kmax_c, q_c kmin_c) (per query head; pooled = max over the group's
      heads); B_needed = the largest rank of a block that holds a needle row, i.e. the smallest B
      whose top-B blocks contain every needle row outside the window;
  (d) the same rank under an oracle exact block score (the block's dense softmax mass; pooled = mean
      over the group's heads).

The query at prompt position n_prompt - 1 (the prefill's last query, which predicts the first
answer token) is measured too and reported apart ("q_last"); summaries are over decode steps.

    .venv/bin/python scripts/analysis/quest_recall.py -m models/qwen0.5b.final16k.tca.gguf \\
        --cells pg:key:0.05,wiki:key:0.25 --answer-tokens 8 --blocks 16,32,64 --threads 2 \\
        -o out/quest_recall.json

--cache DIR keeps each cell's K (all rows) and the measured queries in DIR/<cell>.npz (about 50 MB
at 8K for the 0.5B model) and reuses them on the next run (no dense pass).
"""
import argparse
import glob
import json
import os
import sys
import time

import numpy as np

from tca_ggml.evaluate import make_config, _Builder, _FACTS
from tca_ggml.llama import Llama


def needle_span(tok, tokens, value):
    """Token positions of `value` in the prompt (first occurrence; as probe_selection.needle_span)."""
    for cand in (tok.tokenize(value, add_bos=False), tok.tokenize(" " + value, add_bos=False)):
        n = len(cand)
        for i in range(len(tokens) - n + 1):
            if tokens[i:i + n] == cand:
                return list(range(i, i + n))
    return []


def dense_answer(tokens, cache_root):
    """The cached dense answer of a NIAH prompt (matched by its tokens' digest), or None."""
    from tca_ggml.evalkit.cache import tokens_digest
    dg = tokens_digest(tokens)
    for f in glob.glob(os.path.join(cache_root, "**", "*.json"), recursive=True):
        try:
            d = json.load(open(f))
        except (OSError, ValueError):
            continue
        k = d.get("key", {})
        if k.get("tokens") == dg and k.get("kind") == "niah":
            return d["result"]["answer"]
    return None


def build_cells(model, cells, length, n_answer, cache_root):
    cfg = make_config(model, lengths=[length], tasks=["niah"])
    out = []
    with Llama(cfg.model, vocab_only=True, verbose=False) as tok:
        b = _Builder(tok, cfg.seed)
        for c in cells:
            h, k, d = c.split(":")
            j = b.niah(length, float(d), k, h)
            prompt = list(j.tokens)
            value = j.expected[0]
            ans = dense_answer(prompt, cache_root)
            src = "dense-cache"
            if ans is None:
                ans, src = value, "needle-value"
            # the prompt ends with the assistant turn's start; the answer is its continuation
            atoks = tok.tokenize(ans.strip(), add_bos=False)[:n_answer]
            spans = {"value": needle_span(tok, prompt, value)}
            if k == "fact":  # the answer copies the whole activity: its span too
                act = next(a for _, a, v in _FACTS if v == value)
                spans["act"] = needle_span(tok, prompt, act)
            pieces = [tok.detokenize([t]).decode("utf-8", "replace") for t in atoks]
            out.append(dict(cell=c, prompt=prompt, n_prompt=len(prompt), value=value, answer=ans,
                            answer_source=src, answer_tokens=atoks, answer_pieces=pieces, spans=spans))
    return out


def capture(model, cell, threads, cache_dir):
    """(K per layer float16 [n, n_kv, d], Q at the measured positions per layer [n_pos, n_head, d],
    positions, seconds of the dense pass or 0 when loaded)."""
    P = cell["n_prompt"]
    toks = cell["prompt"] + cell["answer_tokens"]
    pos = np.arange(P - 1, len(toks))
    path = os.path.join(cache_dir, cell["cell"].replace(":", "_") + ".npz") if cache_dir else None
    if path and os.path.exists(path):
        z = np.load(path)
        if int(z["n_tokens"]) == len(toks) and np.array_equal(z["tokens"], np.asarray(toks)):
            nl = int(z["n_layer"])
            return [z[f"K{i}"] for i in range(nl)], [z[f"Q{i}"] for i in range(nl)], z["pos"], 0.0
    from tca_ggml.calibrate import capture_qk
    t0 = time.perf_counter()
    cap = capture_qk(model, toks, n_threads=threads, n_batch=512)
    sec = time.perf_counter() - t0
    K = cap.K
    Q = [np.ascontiguousarray(q[pos]) for q in cap.Q]
    del cap
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        arrs = {f"K{i}": k for i, k in enumerate(K)}
        arrs.update({f"Q{i}": q for i, q in enumerate(Q)})
        np.savez(path, n_layer=len(K), n_tokens=len(toks), tokens=np.asarray(toks), pos=pos, **arrs)
    return K, Q, pos, sec


def rank_needed(S, needle_blocks):
    """Smallest B whose top-B blocks under scores S (..., nb) hold every needle block: the largest
    1-based rank (ties counted against the needle) among the needle blocks."""
    r = 0
    for b in needle_blocks:
        r = np.maximum(r, (S >= S[..., b:b + 1]).sum(-1))
    return r


POOL_SCORES = ("quest_max", "quest_soft", "quest_sum", "exact")
HEAD_SCORES = ("quest_head", "exact_head")


def block_ranks(S):
    """0-based rank of every block under scores S (..., nb), best first."""
    return np.argsort(np.argsort(-S, axis=-1, kind="stable"), axis=-1, kind="stable")


def measure(cell, K, Q, pos, blocks, window, n_head, recall_at):
    """Per span name: needle masses per (step, layer, head) and, per block size and scoring, B_needed
    and the share of the needle's pooled mass that the top-B blocks hold (B in recall_at)."""
    P = cell["n_prompt"]
    R = P - window  # hold-tier rows outside the local window (prompt rows [0, R))
    n_layer = len(K)
    n_kv = K[0].shape[1]
    gq = n_head // n_kv
    d = K[0].shape[2]
    npos = len(pos)
    res = {}
    for sname, span in cell["spans"].items():
        span = np.asarray(span, dtype=np.int64)
        inside = span[span < R]
        r = dict(span=[int(span[0]), int(len(span))] if len(span) else [], rows_outside=int(len(inside)),
                 mass_head=np.zeros((npos, n_layer, n_head)), mass_pool=np.zeros((npos, n_layer, n_kv)),
                 B={}, cap={})
        for s in blocks:
            r["B"][s] = {k: np.zeros((npos, n_layer, n_kv), np.int64) for k in POOL_SCORES}
            r["B"][s].update({k: np.zeros((npos, n_layer, n_head), np.int64) for k in HEAD_SCORES})
            r["cap"][s] = {k: np.zeros((len(recall_at), npos, n_layer, n_kv)) for k in POOL_SCORES}
        res[sname] = r
    for il in range(n_layer):
        Kl = K[il].astype(np.float32)          # [n, n_kv, d]
        Ql = Q[il].astype(np.float32)          # [n_pos, n_head, d]
        # dense softmax of each measured query over the keys <= its position (prompt rows kept), and
        # the log-sum-exp of its logits over the rows a decode step attends anyway (window and later)
        p_prompt = np.zeros((npos, n_head, P), dtype=np.float64)
        lse_win = np.zeros((npos, n_head))
        for ti, t in enumerate(pos):
            for g in range(n_kv):
                lg = (Ql[ti, g * gq:(g + 1) * gq] @ Kl[:t + 1, g].T).astype(np.float64) / np.sqrt(d)
                mx = lg.max(-1, keepdims=True)
                e = np.exp(lg - mx)
                p_prompt[ti, g * gq:(g + 1) * gq] = e[:, :P] / e.sum(-1, keepdims=True)
                lse_win[ti, g * gq:(g + 1) * gq] = np.log(e[:, R:].sum(-1)) + mx[:, 0]
        meta = {}
        for s in blocks:
            starts = np.arange(0, R, s)
            nrow = np.diff(np.append(starts, R))
            kmin = np.minimum.reduceat(Kl[:R], starts, axis=0)         # [nb, n_kv, d]
            kmax = np.maximum.reduceat(Kl[:R], starts, axis=0)
            ub = np.empty((npos, n_head, len(starts)), dtype=np.float64)
            for h in range(n_head):
                g = h // gq
                q = Ql[:, h][:, None, :]                               # [n_pos, 1, d]
                ub[:, h] = np.maximum(q * kmax[None, :, g], q * kmin[None, :, g]).sum(-1) / np.sqrt(d)
            ex = np.add.reduceat(p_prompt[:, :, :R], starts, axis=-1)  # [n_pos, n_head, nb]
            sh = (npos, n_kv, gq, len(starts))
            # Quest pooled: max over the group's heads of the bound (the brief's pooling); sum; and a
            # soft pooling like TCA's mean of softmax rows: each head's bound turned into a mass
            # estimate against what the head gives its window, exp(UB + log rows - lse_window)
            soft = np.exp(np.minimum(ub + np.log(nrow) - lse_win[:, :, None], 50.0))
            meta[s] = dict(quest_head=ub, exact_head=ex,
                           quest_max=ub.reshape(sh).max(2), quest_sum=ub.reshape(sh).sum(2),
                           quest_soft=soft.reshape(sh).mean(2), exact=ex.reshape(sh).mean(2))
        for sname, r in res.items():
            span = np.asarray(cell["spans"][sname], dtype=np.int64)
            mh = p_prompt[:, :, span].sum(-1) if len(span) else np.zeros((npos, n_head))
            r["mass_head"][:, il] = mh
            r["mass_pool"][:, il] = mh.reshape(npos, n_kv, gq).mean(-1)
            inside = span[span < R]
            if not len(inside):
                continue
            for s in blocks:
                m = meta[s]
                nbk = sorted(set((inside // s).tolist()))
                nb = m["exact"].shape[-1]
                # the needle's pooled mass per block
                pn = np.zeros((npos, n_head, nb))
                np.add.at(pn, (slice(None), slice(None), inside // s),
                          p_prompt[:, :, inside])
                pn = pn.reshape(npos, n_kv, gq, nb).mean(2)
                tot = np.maximum(pn.sum(-1), 1e-30)
                for k in HEAD_SCORES:
                    r["B"][s][k][:, il] = rank_needed(m[k], nbk)
                for k in POOL_SCORES:
                    r["B"][s][k][:, il] = rank_needed(m[k], nbk)
                    rk = block_ranks(m[k])
                    for bi, bb in enumerate(recall_at):
                        r["cap"][s][k][bi, :, il] = (pn * (rk < bb)).sum(-1) / tot
        del Kl, Ql, p_prompt, meta
    return res


def dist(x):
    x = np.asarray(x)
    if x.size == 0:
        return None
    mx = x.max()
    return dict(median=float(np.median(x)), p90=float(np.percentile(x, 90)),
                max=int(mx) if np.issubdtype(x.dtype, np.integer) else float(mx), n=int(x.size))


def summarize(cell, res, blocks, window, thr, recall_at):
    P = cell["n_prompt"]
    R = P - window
    out = {}
    for sname, r in res.items():
        mp = r["mass_pool"][1:]     # decode steps (row 0 is the prefill's last query)
        mh = r["mass_head"][1:]
        sel = mp >= thr                                      # [steps, layer, kv]
        selh = mh >= thr
        pairs = sorted({(int(l), int(g)) for _, l, g in zip(*np.nonzero(sel))})
        o = dict(span=r["span"], rows_outside=r["rows_outside"], thr=thr,
                 pairs=pairs, n_pairs=len(pairs), n_triples=int(sel.sum()), n_head_triples=int(selh.sum()),
                 max_pooled_mass=float(mp.max()) if mp.size else 0.0,
                 q_last_pairs=sorted({(int(l), int(g)) for l, g in zip(*np.nonzero(r["mass_pool"][0] >= thr))}),
                 per_step_pairs=[int(x) for x in sel.sum((1, 2))],
                 blocks={})
        if not r["B"] or not r["rows_outside"]:
            out[sname] = o
            continue
        for s in blocks:
            nb = -(-R // s)
            e = dict(n_blocks=nb)
            for k in POOL_SCORES + HEAD_SCORES:
                m = sel if k in POOL_SCORES else selh
                v = r["B"][s][k][1:][m]
                e[k] = dict(B=dist(v), share=dist(v / nb) if v.size else None,
                            recall={str(b): float((v <= b).mean()) if v.size else None for b in recall_at})
                if k in POOL_SCORES:
                    cp = r["cap"][s][k][:, 1:][:, m]           # [n_recall, n_sel]
                    e[k]["mass_captured"] = {str(b): dict(mean=float(cp[bi].mean()), min=float(cp[bi].min()))
                                             if cp.shape[1] else None for bi, b in enumerate(recall_at)}
            # the prefill's last query, for reference
            sl = r["mass_pool"][0] >= thr
            e["q_last"] = {k: dist(r["B"][s][k][0][sl]) for k in POOL_SCORES}
            # per matter-triple detail: (layer, kv, step, pooled mass, B quest_max, quest_soft, exact)
            e["detail"] = [(int(l), int(g), int(t), round(float(mp[t, l, g]), 4),
                            int(r["B"][s]["quest_max"][1 + t, l, g]), int(r["B"][s]["quest_soft"][1 + t, l, g]),
                            int(r["B"][s]["exact"][1 + t, l, g])) for t, l, g in zip(*np.nonzero(sel))]
            o["blocks"][str(s)] = e
        out[sname] = o
    return out


def fmt(dd):
    return "-" if dd is None else f"{dd['median']:g} / {dd['p90']:g} / {dd['max']}"


def table(summary, blocks, recall_at):
    lines = []
    for c in summary["cells"]:
        for sname, o in c["result"].items():
            sp = o["span"]
            lines.append(f"\n### {c['cell']} — span {sname} ({sp[1] if sp else 0} rows at {sp[0] if sp else '-'}); "
                         f"answer ({c['answer_source']}): {c['answer']!r}\n")
            lines.append(f"Matter (pooled needle mass >= {o['thr']}, decode steps 1..{len(o['per_step_pairs'])}): "
                         f"{o['n_pairs']} (layer, kv) pairs, {o['n_triples']} (layer, kv, step) triples "
                         f"(per step {o['per_step_pairs']}); per-query-head triples {o['n_head_triples']}; "
                         f"max pooled needle mass {o['max_pooled_mass']:.3f}\n")
            if not o["blocks"]:
                lines.append("(needle inside the window: nothing to recall)")
                continue
            rh = "/".join(str(b) for b in recall_at)
            lines.append(f"| S | out blocks | scoring | B needed med / p90 / max | share of out blocks med / p90 "
                         f"| all needle rows in top-B, B={rh} | needle mass in top-B (mean), B={rh} |")
            lines.append("|---|---|---|---|---|---|---|")
            for s in blocks:
                e = o["blocks"][str(s)]
                for k in POOL_SCORES + HEAD_SCORES:
                    x = e[k]
                    sh = x["share"]
                    shs = "-" if sh is None else f"{sh['median']:.3f} / {sh['p90']:.3f}"
                    rc = " / ".join("-" if x["recall"][str(b)] is None else f"{x['recall'][str(b)]:.2f}"
                                    for b in recall_at)
                    mc = x.get("mass_captured")
                    mcs = "(per head)" if mc is None else " / ".join(
                        "-" if mc[str(b)] is None else f"{mc[str(b)]['mean']:.2f}" for b in recall_at)
                    lines.append(f"| {s} | {e['n_blocks']} | {k} | {fmt(x['B'])} | {shs} | {rc} | {mcs} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("--cells", default="pg:key:0.05,wiki:key:0.25,wiki:fact:0.25,pg:number:0.5,wiki:number:0.05",
                    help="haystack:kind:depth, comma-separated")
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--answer-tokens", type=int, default=8)
    ap.add_argument("--blocks", default="16,32,64")
    ap.add_argument("--window", type=int, default=4096, help="local window (rows at the prompt's end, always attended)")
    ap.add_argument("--thr", type=float, default=0.05, help="pooled needle mass for a (layer, kv head, step) to matter")
    ap.add_argument("--recall-at", default="4,8,16,32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dense-cache", default="docs/eval-cache/dense")
    ap.add_argument("--cache", default="", help="directory to keep/reuse each cell's capture (npz)")
    ap.add_argument("-o", "--out", default="out/quest_recall.json")
    a = ap.parse_args()
    blocks = [int(x) for x in a.blocks.split(",")]
    recall_at = [int(x) for x in a.recall_at.split(",")]
    cells = build_cells(a.model, a.cells.split(","), a.length, a.answer_tokens, a.dense_cache)
    summary = dict(model=a.model, length=a.length, window=a.window, blocks=blocks, thr=a.thr,
                   pooling="needle mass: mean of the group's softmax rows (TCA's pooling); block scorings: "
                           "quest_max = max over the group's heads of Quest's bound; quest_sum = their sum; "
                           "quest_soft = mean over heads of exp(UB + log rows - lse of the window); exact = mean "
                           "over heads of the block's dense softmax mass (oracle); *_head = per query head",
                   cells=[])
    for c in cells:
        t0 = time.perf_counter()
        K, Q, pos, sec = capture(a.model, c, a.threads, a.cache)
        n_head = Q[0].shape[1]
        t1 = time.perf_counter()
        res = measure(c, K, Q, pos, blocks, a.window, n_head, recall_at)
        t2 = time.perf_counter()
        del K, Q
        s = summarize(c, res, blocks, a.window, a.thr, recall_at)
        summary["cells"].append(dict(cell=c["cell"], n_prompt=c["n_prompt"], value=c["value"], answer=c["answer"],
                                     answer_source=c["answer_source"], answer_pieces=c["answer_pieces"],
                                     dense_pass_s=round(sec, 1), analysis_s=round(t2 - t1, 1), result=s))
        print(f"{c['cell']}: n_prompt={c['n_prompt']} span={ {k: (v[:1], len(v)) for k, v in c['spans'].items()} } "
              f"answer[{c['answer_source']}]={c['answer_pieces']} dense {sec:.0f}s analysis {t2 - t1:.0f}s "
              f"total {time.perf_counter() - t0:.0f}s", flush=True)
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(summary, f, indent=1)
    print(table(summary, blocks, recall_at))
    return 0


if __name__ == "__main__":
    sys.exit(main())
