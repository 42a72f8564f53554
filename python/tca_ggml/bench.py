"""`tca-ggml bench`: speed and memory, TCA against upstream dense attention, side by side.

    tca-ggml bench -m MODEL [-p 4096,8192] [-n 32] [-d 0] [-r 1] [-o md|json]
                   [--density X] [--tca-window W] [--tca-block B] [--threads N] [--dense-fa 1]
                   [--parallel 1,4,8]

llama-bench conventions: -p prompt lengths (prefill, time to first token), -n generated
tokens (decode), -d depth (tokens already in the context before the timed prompt), -r
repetitions. Each repetition runs the dense arm and the TCA arm one after the other
(interleaved), each in a fresh worker process of the same build, so peak memory is per arm.

Both arms are the same libtca_ggml.so. The dense arm never touches TCA code: without
tca=True the context is created by upstream's llama_init_from_model, create_memory returns
upstream's llama_kv_cache (patch 0002 only adds a branch taken when a TCA configuration was
handed over), and build_attn runs upstream's path (the hook returns nullptr for a
non-TCA input). The prompt is real text (Paul Graham's essays).

With --density X the TCA arm uses a forced uniform budget (uncalibrated, labelled so);
otherwise the GGUF's calibrated budgets.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def _arm_kwargs(a) -> dict:
    kw = {}
    if a.arm in ("tca", "forced", "prefill2"):
        kw = dict(tca=True)
        if a.arm == "forced":
            kw["tca_density"] = a.also_density
        elif a.density is not None:
            kw["tca_density"] = a.density
        if a.tca_window is not None:
            kw["tca_window"] = a.tca_window
        if a.tca_block is not None:
            kw["tca_block"] = a.tca_block
        if a.retention is not None:
            kw["tca_retention"] = a.retention
        if a.prefill is not None:
            kw["tca_prefill"] = a.prefill
        for k, v in _opts(a.tca_opt).items():
            kw[f"tca_{k}"] = v
        if a.arm == "prefill2":
            if a.also_prefill is not None:
                kw["tca_prefill"] = a.also_prefill
            for k, v in _opts(a.also_opt).items():
                kw[f"tca_{k}"] = v
    return kw


def _opts(items) -> dict:
    """--tca-opt / --also-opt KEY=VALUE items -> {key: value} (as `tca-ggml eval --tca-opt`)."""
    from .evaluate import parse_tca_opts
    return parse_tca_opts(items)


def _worker(a) -> dict:
    import resource
    from . import texts
    from .llama import Llama
    kw = _arm_kwargs(a)
    if a.parallel:
        return _worker_parallel(a, kw)
    n_ctx = a.depth + a.prompt + a.gen + 8
    # both arms use the dense arm's flash-attention setting: a TCA context that falls back to the
    # dense cache (n_ctx <= w + b) is then exactly the dense arm; an active TCA context ignores it
    flash = bool(a.dense_fa)
    llm = Llama(a.model, n_ctx=n_ctx, n_batch=a.batch, n_ubatch=a.batch, n_threads=a.threads,
                n_threads_batch=a.threads, flash_attn=flash, n_gpu_layers=a.n_gpu_layers, verbose=False, **kw)
    try:
        toks = llm.tokenize(texts.haystack((a.depth + a.prompt) * 6).encode(), add_bos=True)
        if len(toks) < a.depth + a.prompt:
            raise SystemExit("error: not enough text for the requested length")
        toks = toks[: a.depth + a.prompt]
        if a.depth:
            llm.eval_prompt(toks[: a.depth])
        t0 = time.perf_counter()
        llm._decode(toks[a.depth:], a.depth)
        t1 = time.perf_counter()
        gen = 0
        td = time.perf_counter()
        tok = int(llm._logits_last().argmax())
        t_first = 0.0
        step_s = []
        for _ in range(a.gen):
            ts = time.perf_counter()
            llm._decode([tok], len(llm._tokens))
            tok = int(llm._logits_last().argmax())
            step_s.append(time.perf_counter() - ts)
            gen += 1
            if gen == 1:
                # hold retention: the final selection after the prompt runs before this first step
                t_first = time.perf_counter() - td
        t2 = time.perf_counter()
        mem = llm.memory_bytes()
        # the statistics flush what is owed: with every step holding, the prompt's final selection
        # (deferred until a ubatch reads the kept set, docs/design.md "Retention") runs here
        ts = time.perf_counter()
        st = llm.tca_stats()
        t_flush = time.perf_counter() - ts
        return {"arm": a.arm, "flush_s": t_flush, "final_lazy": st.get("n_final_lazy", 0), "label": llm.tca_label, "prefill": st.get("prefill"), "active": st["active"], "prompt": a.prompt, "depth": a.depth,
                "gen": gen, "ttft_s": t1 - t0, "prefill_tps": a.prompt / (t1 - t0),
                "decode_tps": gen / (t2 - td) if gen else 0.0, "first_step_s": t_first,
                "decode_steady_tps": (gen - 1) / (t2 - td - t_first) if gen > 1 else 0.0, "kv_bytes": mem["kv"],
                "kv_dense_bytes": st["bytes_dense"] if st["active"] else mem["kv"],
                "rows_kept": st["rows_kept"], "t_compact_ms": st["t_compact_ms"],
                "kv_fast_bytes": st["bytes_fast"] if st["active"] else mem["kv"],
                "kv_hold_bytes": st["bytes_hold"] if st["active"] else 0,
                "kv_resident_bytes": st["bytes_resident"] if st["active"] else mem["kv"],
                "retention": st.get("retention"), "hold_decode": st.get("hold_decode") or 0, "step_s": step_s,
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "n_ctx": llm.n_ctx(), "threads": llm.n_threads}
    finally:
        llm.close()


def _worker_parallel(a, kw) -> dict:
    """Parallel mode (--parallel 1,4,8): aggregate decode speed of N sequences decoded together, each
    at depth `prompt`. One context of max(N) sequences (n_ctx / n_seq_max each); each sequence is
    prefilled with its own text (consecutive pieces of the essays: independent requests; a whole-
    sequence copy would be cheaper, but upstream's cache decodes copied streams several times slower
    on the CPU, 0.7 vs 19 t/s in a probe: not the dense arm's real speed), then every sequence runs
    its hold-decode steps (TCA: the steps after a prompt that attend every held row) and one more,
    untimed; then for each N, `gen` steps of sequences 0..N-1 together (one llama_decode, one graph a
    step) are timed. TTFT is the mean prefill of one sequence."""
    import resource
    import numpy as np
    from . import texts
    from .llama import Llama
    ns = sorted(set(a.parallel))
    nmax = ns[-1]
    hd = 32 if kw.get("tca") else 0   # refined below from the context's resolved configuration
    n_ctx_seq = a.prompt + a.gen * len(ns) + 64 + 8
    n_ctx_seq = (n_ctx_seq + 255) // 256 * 256
    llm = Llama(a.model, n_ctx=nmax * n_ctx_seq, n_seq_max=nmax, n_batch=max(a.batch, nmax), n_ubatch=a.batch,
                n_threads=a.threads, n_threads_batch=a.threads, flash_attn=bool(a.dense_fa),
                n_gpu_layers=a.n_gpu_layers, verbose=False, **kw)
    try:
        L, ffi = llm._L, llm._ffi
        all_toks = llm.tokenize(texts.haystack(a.prompt * 6 * nmax).encode(), add_bos=False)
        if len(all_toks) < a.prompt * nmax:
            raise SystemExit("error: not enough text for the requested length")
        bos = llm.tokenize(b"", add_bos=True, special=True)[:1]
        nv = llm.n_vocab()
        cur, ttft = [], 0.0
        for s in range(nmax):
            toks = (bos + all_toks[s * a.prompt:(s + 1) * a.prompt])[: a.prompt]
            t0 = time.perf_counter()
            llm._decode(toks, 0, seq_id=s, mirror=False)
            ttft += (time.perf_counter() - t0) / nmax
            cur.append(int(np.argmax(np.frombuffer(ffi.buffer(L.llama_get_logits_ith(llm._ctx, -1), 4 * nv),
                                                   np.float32))))
        st = llm.tca_stats()
        if st["active"]:
            hd = max(0, int(st.get("hold_decode") or 0))   # -1: every step holds (none is different)
        pos = [a.prompt] * nmax
        b = llm._batch

        def steps(seqs, n):
            t = time.perf_counter()
            for _ in range(n):
                b.n_tokens = len(seqs)
                for i, s in enumerate(seqs):
                    b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = cur[s], pos[s], 1, 1
                    b.seq_id[i][0] = s
                if L.llama_decode(llm._ctx, b) != 0:
                    raise RuntimeError("llama_decode failed in the parallel decode")
                for i, s in enumerate(seqs):
                    pos[s] += 1
                    cur[s] = int(np.argmax(np.frombuffer(ffi.buffer(L.llama_get_logits_ith(llm._ctx, i), 4 * nv),
                                                         np.float32)))
            return time.perf_counter() - t

        steps(list(range(nmax)), hd + 1)   # untimed: the hold-decode steps and the first after them
        agg = {}
        for n in ns:
            agg[str(n)] = n * a.gen / steps(list(range(n)), a.gen)
        st = llm.tca_stats()
        m = llm.memory_bytes()
        return {"arm": a.arm, "label": llm.tca_label, "active": st["active"], "prompt": a.prompt, "gen": a.gen,
                "parallel": ns, "agg_decode_tps": agg, "ttft_s": ttft, "hold_decode": hd,
                "kv_bytes": m["kv"], "kv_dense_bytes": st["bytes_dense"] if st["active"] else m["kv"],
                "kv_fast_bytes": st["bytes_fast"] if st["active"] else m["kv"],
                "kv_hold_bytes": st["bytes_hold"] if st["active"] else 0,
                "kv_resident_bytes": st["bytes_resident"] if st["active"] else m["kv"],
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "threads": llm.n_threads}
    finally:
        llm.close()


def run_parallel(a) -> list:
    rows = []
    for p in a.p:
        res = {arm: _run_arm(a, arm, p) for arm in ("dense", "tca")}
        d, t = res["dense"], res["tca"]
        for n in d["parallel"]:
            dn, tn = d["agg_decode_tps"][str(n)], t["agg_decode_tps"][str(n)]
            rows.append({"prompt": p, "n_seq": n, "gen": a.n, "tca_label": t["label"], "threads": d["threads"],
                         "dense_fa": bool(a.dense_fa), "dense_agg_tps": dn, "tca_agg_tps": tn,
                         "ratio": tn / dn if dn else 0.0, "dense_kv_bytes": d["kv_bytes"],
                         "tca_kv_bytes": t["kv_fast_bytes"], "tca_hold_bytes": t["kv_hold_bytes"],
                         "tca_resident_bytes": t["kv_resident_bytes"], "n_seq_max": max(d["parallel"]),
                         "hold_decode": t["hold_decode"], "n_gpu_layers": a.n_gpu_layers,
                         "dense_ttft_s": d["ttft_s"], "tca_ttft_s": t["ttft_s"]})
            print(f"[bench] p={p} x {n} sequences: dense {dn:.2f} t/s, TCA {tn:.2f} t/s", file=sys.stderr)
    return rows


def parallel_markdown(rows, model) -> str:
    mib = 1 << 20
    r0 = rows[0] if rows else {}
    out = [f"model: {os.path.basename(model)}; TCA: {r0.get('tca_label', '')}; dense: upstream "
           f"{'flash' if r0.get('dense_fa') else 'non-flash'} attention; threads {r0.get('threads', '')}; GPU layers {r0.get('n_gpu_layers', 0)}; parallel "
           f"decode: one context of {r0.get('n_seq_max', '')} sequences, each prefilled with its own text; "
           f"aggregate t/s = N x {r0.get('gen', '')} steps / time, after every sequence's "
           f"{r0.get('hold_decode', 0)} hold-decode steps; KV: all sequences, allocated (TCA fast tier) / resident",
           "",
           "| p (each) | sequences | dense t/s | TCA t/s | ratio | dense KV MiB | TCA KV MiB | TCA resident MiB | TCA hold MiB |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['prompt']} | {r['n_seq']} | {r['dense_agg_tps']:.2f} | {r['tca_agg_tps']:.2f} | "
                   f"**{r['ratio']:.2f}x** | {r['dense_kv_bytes'] / mib:.0f} | {r['tca_kv_bytes'] / mib:.0f} | "
                   f"{r['tca_resident_bytes'] / mib:.0f} | {r['tca_hold_bytes'] / mib:.0f} |")
    return "\n".join(out)


def _run_arm(a, arm, prompt) -> dict:
    cmd = [sys.executable, "-m", "tca_ggml.bench", "--worker", "--arm", arm, "-m", a.model, "--prompt", str(prompt),
           "--gen", str(a.n), "--depth", str(a.d), "--batch", str(a.batch), "--dense-fa", str(a.dense_fa)]
    if a.threads:
        cmd += ["--threads", str(a.threads)]
    if a.n_gpu_layers:
        cmd += ["--n-gpu-layers", str(a.n_gpu_layers)]
    if a.density is not None:
        cmd += ["--density", str(a.density)]
    if a.also_density is not None:
        cmd += ["--also-density", str(a.also_density)]
    if a.tca_window is not None:
        cmd += ["--tca-window", str(a.tca_window)]
    if a.tca_block is not None:
        cmd += ["--tca-block", str(a.tca_block)]
    if a.retention is not None:
        cmd += ["--retention", a.retention]
    if a.prefill is not None:
        cmd += ["--prefill", a.prefill]
    if a.also_prefill is not None:
        cmd += ["--also-prefill", a.also_prefill]
    for flag, items in (("--tca-opt", a.tca_opt), ("--also-opt", a.also_opt)):
        for it in items or []:
            cmd += [flag, it]
    if a.parallel:
        cmd += ["--parallel", ",".join(str(x) for x in a.parallel)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{arm} arm failed at p={prompt}: {r.stderr.strip()[-800:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def run(a) -> list:
    rows = []
    for p in a.p:
        arms = ("dense", "tca") + (("forced",) if a.also_density is not None else ()) + \
            (("prefill2",) if a.also_prefill is not None or a.also_opt else ())
        res = {arm: [] for arm in arms}
        for _ in range(a.r):
            for arm in arms:
                res[arm].append(_run_arm(a, arm, p))
                print(f"[bench] p={p} {arm}: prefill {res[arm][-1]['prefill_tps']:.1f} t/s, "
                      f"decode {res[arm][-1]['decode_tps']:.2f} t/s", file=sys.stderr)
        d, t = res["dense"], res["tca"]
        row = {"prompt": p, "depth": a.d, "gen": a.n, "reps": a.r, "tca_label": t[0]["label"],
               "tca_active": t[0]["active"],
               "dense_ttft_s": _median([x["ttft_s"] for x in d]), "tca_ttft_s": _median([x["ttft_s"] for x in t]),
               "dense_prefill_tps": _median([x["prefill_tps"] for x in d]),
               "tca_prefill_tps": _median([x["prefill_tps"] for x in t]),
               "dense_decode_tps": _median([x["decode_tps"] for x in d]),
               "tca_decode_tps": _median([x["decode_tps"] for x in t]),
               "dense_steady_tps": _median([x["decode_steady_tps"] for x in d]),
               "tca_steady_tps": _median([x["decode_steady_tps"] for x in t]),
               "tca_first_step_s": _median([x["first_step_s"] for x in t]),
               "tca_flush_s": _median([x.get("flush_s", 0.0) for x in t]),
               "dense_kv_bytes": d[0]["kv_bytes"], "tca_kv_bytes": t[0]["kv_fast_bytes"],
               "tca_hold_bytes": t[0]["kv_hold_bytes"], "tca_resident_bytes": t[0]["kv_resident_bytes"],
               "tca_retention": t[0].get("retention"),
               "dense_peak_rss": max(x["peak_rss_bytes"] for x in d), "tca_peak_rss": max(x["peak_rss_bytes"] for x in t),
               "tca_compact_ms": _median([x["t_compact_ms"] for x in t]), "threads": d[0]["threads"],
               "dense_fa": bool(a.dense_fa)}
        # retention hold: the first hold_decode steps attend every held row (the answer's start);
        # decode after them, both arms over the same steps
        hd_raw = int(t[0].get("hold_decode") or 0)
        nh = max(0, hd_raw)   # -1 (every step holds, the CPU default): all steps alike
        after = lambda xs, nh=nh: _median([(len(x["step_s"]) - nh - 1) / sum(x["step_s"][nh + 1:])  # noqa: E731
                                           if len(x["step_s"]) > nh + 1 else 0.0 for x in xs])
        row.update({"tca_hold_decode": hd_raw, "dense_after_tps": after(d), "tca_after_tps": after(t)})
        row["after_ratio"] = row["tca_after_tps"] / row["dense_after_tps"] if row["dense_after_tps"] else 0.0
        row["prefill_ratio"] = row["tca_prefill_tps"] / row["dense_prefill_tps"]
        row["decode_ratio"] = row["tca_decode_tps"] / row["dense_decode_tps"] if row["dense_decode_tps"] else 0.0
        row["steady_ratio"] = row["tca_steady_tps"] / row["dense_steady_tps"] if row["dense_steady_tps"] else 0.0
        row["kv_ratio"] = row["tca_kv_bytes"] / row["dense_kv_bytes"]
        row["resident_ratio"] = row["tca_resident_bytes"] / row["dense_kv_bytes"]
        if "forced" in res:
            f = res["forced"]
            row.update({"forced_label": f[0]["label"], "forced_ttft_s": _median([x["ttft_s"] for x in f]),
                        "forced_prefill_tps": _median([x["prefill_tps"] for x in f]),
                        "forced_decode_tps": _median([x["decode_tps"] for x in f]),
                        "forced_kv_bytes": f[0]["kv_fast_bytes"], "forced_hold_bytes": f[0]["kv_hold_bytes"],
                        "forced_peak_rss": max(x["peak_rss_bytes"] for x in f),
                        "forced_compact_ms": _median([x["t_compact_ms"] for x in f])})
            row["forced_prefill_ratio"] = row["forced_prefill_tps"] / row["dense_prefill_tps"]
            row["forced_decode_ratio"] = row["forced_decode_tps"] / row["dense_decode_tps"] if row["dense_decode_tps"] else 0.0
            row["forced_kv_ratio"] = row["forced_kv_bytes"] / row["dense_kv_bytes"]
        if "prefill2" in res:
            f = res["prefill2"]
            nh2 = max(0, int(f[0].get("hold_decode") or 0))
            dense_after2 = after(d, nh2)
            row.update({"tca_prefill": t[0].get("prefill"), "prefill2": f[0].get("prefill"),
                        "prefill2_opts": " ".join((["prefill=" + a.also_prefill] if a.also_prefill else []) +
                                                  list(a.also_opt or [])),
                        "prefill2_hold_decode": int(f[0].get("hold_decode") or 0),
                        "prefill2_after_tps": after(f, nh2), "dense_after2_tps": dense_after2,
                        "prefill2_hold_bytes": f[0]["kv_hold_bytes"],
                        "prefill2_ttft_s": _median([x["ttft_s"] for x in f]),
                        "prefill2_prefill_tps": _median([x["prefill_tps"] for x in f]),
                        "prefill2_decode_tps": _median([x["decode_tps"] for x in f]),
                        "prefill2_steady_tps": _median([x["decode_steady_tps"] for x in f]),
                        "prefill2_first_step_s": _median([x["first_step_s"] for x in f]),
                        "prefill2_flush_s": _median([x.get("flush_s", 0.0) for x in f]),
                        "prefill2_resident_bytes": f[0]["kv_resident_bytes"]})
            row["prefill2_prefill_ratio"] = row["prefill2_prefill_tps"] / row["dense_prefill_tps"]
            row["prefill2_decode_ratio"] = row["prefill2_decode_tps"] / row["dense_decode_tps"] if row["dense_decode_tps"] else 0.0
            row["prefill2_steady_ratio"] = row["prefill2_steady_tps"] / row["dense_steady_tps"] if row["dense_steady_tps"] else 0.0
            row["prefill2_after_ratio"] = row["prefill2_after_tps"] / dense_after2 if dense_after2 else 0.0
        rows.append(row)
    return rows


def _hold_words(hd: int) -> str:
    if hd < 0:
        return ("every decode step attends every held row (tca_hold_decode=-1): 'after' = decode t/s of both "
                "arms over the steps after the first")
    return (f"the first {hd} steps attend every held row (tca_hold_decode): 'after' = decode t/s of both arms "
            f"over the steps after those")


def to_markdown(rows, model) -> str:
    mib = 1 << 20
    out = [f"model: {os.path.basename(model)}; TCA: {rows[0]['tca_label'] if rows else ''}; dense: upstream "
           f"{'flash' if rows and rows[0]['dense_fa'] else 'non-flash'} attention; threads {rows[0]['threads'] if rows else ''}; "
           f"retention {rows[0].get('tca_retention') if rows else ''} (TCA KV = the fast tier attention reads, allocated: "
           f"its peak; resident = the rows it holds after the prompt and the generated tokens; "
           f"hold = the tier holding every row until a prompt's end, 0 with retention 'stream'; decode t/s over all "
           f"generated tokens; the final selection after the prompt (retention 'hold') runs before the first step "
           f"that reads the kept set (after the hold-decode steps) or, still owed after the last step, in the "
           f"statistics call ('sel. after s'); the steady ratio leaves the 1st step out; "
           f"{_hold_words(rows[0].get('tca_hold_decode', 0) if rows else 0)})",
           "",
           "| p | depth | dense prefill t/s | TCA prefill t/s | ratio | dense TTFT s | TCA TTFT s | dense decode t/s | TCA decode t/s | ratio | TCA 1st step s | steady ratio | dense after t/s | TCA after t/s | after ratio | dense KV MiB | TCA KV MiB | KV ratio | TCA resident MiB | resident ratio | TCA hold MiB | dense peak RSS MiB | TCA peak RSS MiB | TCA sel. after s |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['prompt']} | {r['depth']} | {r['dense_prefill_tps']:.1f} | {r['tca_prefill_tps']:.1f} | "
                   f"**{r['prefill_ratio']:.2f}x** | {r['dense_ttft_s']:.1f} | {r['tca_ttft_s']:.1f} | "
                   f"{r['dense_decode_tps']:.2f} | {r['tca_decode_tps']:.2f} | **{r['decode_ratio']:.2f}x** | "
                   f"{r.get('tca_first_step_s', 0.0):.2f} | {r.get('steady_ratio', 0.0):.2f}x | "
                   f"{r.get('dense_after_tps', 0.0):.2f} | {r.get('tca_after_tps', 0.0):.2f} | "
                   f"**{r.get('after_ratio', 0.0):.2f}x** | "
                   f"{r['dense_kv_bytes'] / mib:.0f} | {r['tca_kv_bytes'] / mib:.0f} | {r['kv_ratio']:.2f} | "
                   f"{r['tca_resident_bytes'] / mib:.0f} | {r['resident_ratio']:.2f} | "
                   f"{r.get('tca_hold_bytes', 0) / mib:.0f} | "
                   f"{r['dense_peak_rss'] / mib:.0f} | {r['tca_peak_rss'] / mib:.0f} | {r.get('tca_flush_s', 0.0):.2f} |")
    if rows and "forced_label" in rows[0]:
        out += ["", f"second TCA arm: {rows[0]['forced_label']}", "",
                "| p | forced prefill t/s | ratio vs dense | forced decode t/s | ratio | forced KV MiB | KV ratio | peak RSS MiB |",
                "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            out.append(f"| {r['prompt']} | {r['forced_prefill_tps']:.1f} | **{r['forced_prefill_ratio']:.2f}x** | "
                       f"{r['forced_decode_tps']:.2f} | **{r['forced_decode_ratio']:.2f}x** | {r['forced_kv_bytes'] / mib:.0f} | "
                       f"{r['forced_kv_ratio']:.2f} | {r['forced_peak_rss'] / mib:.0f} |")
    if rows and "prefill2" in rows[0]:
        out += ["", f"TCA arm prefill: {rows[0]['tca_prefill']}; third arm: the same budgets with "
                    f"{rows[0]['prefill2_opts']} (prefill {rows[0]['prefill2']}, hold-decode steps "
                    f"{rows[0]['prefill2_hold_decode']}; 'after' against dense over the same steps)", "",
                "| p | prefill t/s | TTFT ratio vs dense | TTFT s | decode t/s | decode ratio | 1st step s | steady ratio | after t/s | after ratio | resident MiB | hold MiB | sel. after s |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            out.append(f"| {r['prompt']} | {r['prefill2_prefill_tps']:.1f} | **{r['prefill2_prefill_ratio']:.2f}x** | "
                       f"{r['prefill2_ttft_s']:.1f} | {r['prefill2_decode_tps']:.2f} | **{r['prefill2_decode_ratio']:.2f}x** | "
                       f"{r['prefill2_first_step_s']:.2f} | {r['prefill2_steady_ratio']:.2f}x | "
                       f"{r['prefill2_after_tps']:.2f} | **{r['prefill2_after_ratio']:.2f}x** | "
                       f"{r['prefill2_resident_bytes'] / mib:.0f} | {r['prefill2_hold_bytes'] / mib:.0f} | "
                       f"{r.get('prefill2_flush_s', 0.0):.2f} |")
    return "\n".join(out)


def _ints(s):
    try:
        v = [int(x) for x in str(s).split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}")
    if not v or min(v) <= 0:
        raise argparse.ArgumentTypeError("lengths must be positive")
    return v


def add_arguments(ap) -> None:
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("-p", type=_ints, default=[4096], help="prompt lengths (comma-separated)")
    ap.add_argument("-n", type=int, default=32, help="generated tokens")
    ap.add_argument("-d", type=int, default=0, help="depth before the timed prompt")
    ap.add_argument("-r", type=int, default=1, help="repetitions (median reported)")
    ap.add_argument("-o", choices=["md", "json"], default="md")
    ap.add_argument("--density", type=float, default=None, help="forced uniform TCA density (uncalibrated)")
    ap.add_argument("--also-density", type=float, default=None,
                    help="add a third arm: forced uniform density X (uncalibrated), beside the calibrated one")
    ap.add_argument("--tca-window", type=int, default=None)
    ap.add_argument("--tca-block", type=int, default=None)
    ap.add_argument("--retention", choices=["hold", "stream"], default=None,
                    help="TCA retention policy (default hold; docs/design.md 'Retention')")
    ap.add_argument("--prefill", choices=["sparse", "dense", "early"], default=None,
                    help="what a prompt's ubatches attend (default early with hold, sparse with stream; "
                         "dense: every row; early: every row in the first half of the layers)")
    ap.add_argument("--also-prefill", choices=["sparse", "dense", "early"], default=None,
                    help="add an arm: the TCA arm's budgets with this prefill mode (hold retention)")
    ap.add_argument("--tca-opt", action="append", metavar="KEY=VALUE",
                    help="a TCA option of the TCA arms, passed as tca_KEY=VALUE (e.g. hold_decode=-1); repeatable")
    ap.add_argument("--also-opt", action="append", metavar="KEY=VALUE",
                    help="add an arm: the TCA arm's options with these set too (e.g. hold_decode=-1, "
                         "hold_type=8 for a q8_0 hold tier); repeatable")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("-ngl", "--n-gpu-layers", type=int, default=0,
                    help="layers on the GPU, both arms (-1: all; a CUDA build)")
    ap.add_argument("--dense-fa", type=int, default=1, choices=[0, 1], help="dense arm with flash attention (upstream's faster CPU path)")
    ap.add_argument("--parallel", type=_ints, default=None,
                    help="parallel mode: aggregate decode t/s of N sequences decoded together (e.g. 1,4,8), "
                         "each at depth -p, one context of max(N) sequences; -n steps each")


def main_cli(a) -> int:
    if not os.path.exists(a.model):
        print(f"error: model not found: {a.model}", file=sys.stderr)
        return 2
    for name, v in (("--density", a.density), ("--also-density", a.also_density)):
        if v is not None and not 0 < v <= 1:
            print(f"error: {name} must be in (0, 1]", file=sys.stderr)
            return 2
    if a.n < 0 or a.d < 0 or a.r < 1:
        print("error: -n and -d must be >= 0, -r >= 1", file=sys.stderr)
        return 2
    from .gguf_meta import read_budgets, read_kv
    try:
        md = read_kv(a.model)
        arch = md.get("general.architecture")
        n_ctx_train = int(md.get(f"{arch}.context_length", 0))
    except Exception as e:  # noqa: BLE001
        print(f"error: cannot read {a.model}: {e}", file=sys.stderr)
        return 2
    for p in a.p:
        if n_ctx_train and a.d + p + a.n > n_ctx_train:
            print(f"error: depth + prompt + generated = {a.d + p + a.n} exceeds the model's context {n_ctx_train}",
                  file=sys.stderr)
            return 2
    if a.density is None and read_budgets(a.model) is None:
        print(f"error: {a.model} is not calibrated; run `tca-ggml calibrate` or pass --density X (forced)",
              file=sys.stderr)
        return 2
    try:
        _opts(a.tca_opt), _opts(a.also_opt)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.parallel and (a.d or a.also_density is not None or a.also_prefill is not None or a.also_opt
                       or a.r != 1 or a.n < 1):
        print("error: --parallel takes -p, -n >= 1 and the TCA options (no -d, -r, --also-*)", file=sys.stderr)
        return 2
    if a.parallel and max(a.parallel) > 256:
        print("error: --parallel: at most 256 sequences", file=sys.stderr)
        return 2
    try:
        rows = run_parallel(a) if a.parallel else run(a)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if a.o == "json":
        print(json.dumps({"model": a.model, "rows": rows}, indent=1))
    else:
        print(parallel_markdown(rows, a.model) if a.parallel else to_markdown(rows, a.model))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="tca-ggml bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--arm", choices=["dense", "tca", "forced", "prefill2"], help=argparse.SUPPRESS)
    ap.add_argument("--prompt", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--gen", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--depth", type=int, default=0, help=argparse.SUPPRESS)
    add_arguments(ap)
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(_worker(a)))
        return 0
    return main_cli(a)


if __name__ == "__main__":
    sys.exit(main())
