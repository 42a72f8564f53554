"""Probe the final selection's levers on given NIAH cells without paying for a prefill per variant.

For each cell: one TCA prefill with the base options, the state saved (its hold tier holds every
row); then per variant a context with that variant's options loads the state and the same prompt is
completed again -- `Llama.eval_prompt` re-evaluates the prompt's last ubatch (design.md "the same
prompt again"), so the last ubatch's attention over the hold tier and the final selection run under
the variant's options. Valid for options that act at the prompt's end only (obs, whole, pool via
TCA_GGML_POOL is per process: not here); a prefill option (prefill=dense) needs `--full`.

    python scripts/analysis/probe_selection.py -m models/qwen0.5b.final16k.tca.gguf \\
        --cells pg:key:0.05,pg:fact:0.25 --variant whole=16 --variant obs=128,whole=16

Prints one line per cell and variant: answer, exact-match score, kept fraction, and how many KV
heads keep every token of the needle's value.
"""
import argparse
import sys
import time

import numpy as np

from tca_ggml.evaluate import make_config, _Builder, NIAH_MAX_TOKENS, parse_tca_opts, score_answer
from tca_ggml.llama import Llama


def parse_variant(s):
    return {f"tca_{k}": v for k, v in parse_tca_opts([kv for kv in s.split(",") if kv]).items()} if s else {}


def needle_span(llm, tokens, value):
    """Token positions of the needle's value in the prompt (the first occurrence)."""
    vt = llm.tokenize(value, add_bos=False)
    for cand in (vt, llm.tokenize(" " + value, add_bos=False)):
        n = len(cand)
        for i in range(len(tokens) - n + 1):
            if tokens[i:i + n] == cand:
                return list(range(i, i + n))
    # fall back: the longest token run of the value's pieces
    return []


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--cells", required=True, help="haystack:kind:depth, comma-separated")
    ap.add_argument("--base", default="", help="options of the prefill (k=v,...)")
    ap.add_argument("--variant", action="append", default=[], help="k=v,... (repeatable); '' = base")
    ap.add_argument("--full", action="append", default=[], help="variants that need their own prefill")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    cfg = make_config(a.model, lengths=[a.length], tasks=["niah"], threads=a.threads)
    base = parse_variant(a.base)
    with Llama(cfg.model, vocab_only=True, verbose=False) as tok:
        b = _Builder(tok, cfg.seed)
        jobs = []
        for c in a.cells.split(","):
            h, k, d = c.split(":")
            j = b.niah(a.length, float(d), k, h)
            j.n_ctx = cfg.ctx_for(a.length, NIAH_MAX_TOKENS)
            jobs.append(j)
    for j in jobs:
        label = f"{j.params['haystack']}:{j.params['kind']}:{j.params['depth']:g}"
        common = dict(n_ctx=j.n_ctx, n_batch=512, n_ubatch=512, n_threads=a.threads, n_threads_batch=a.threads,
                      verbose=False, tca=True)

        def run(llm, name, t0):
            r = llm.create_completion(list(j.tokens), max_tokens=j.max_tokens, temperature=0.0, repeat_penalty=1.0)
            ans = r["choices"][0]["text"]
            span = needle_span(llm, j.tokens, j.expected[0])
            st = llm.tca_stats()
            full = some = 0
            for l, g in zip(st["layer"].tolist(), st["kv_head"].tolist()):
                kept = np.isin(span, llm.tca_retained_positions(l, g)) if span else np.zeros(1, bool)
                full += bool(kept.all())
                some += bool(kept.any())
            print(f"{label:18s} {name:28s} score={score_answer(ans, j.expected):.0f} "
                  f"heads_all={full}/{len(st['layer'])} heads_any={some} needle@{span[:1]}+{len(span)} "
                  f"{time.perf_counter() - t0:6.1f}s ans={ans.strip()[:60]!r}", flush=True)

        t0 = time.perf_counter()
        with Llama(cfg.model, **common, **base) as llm:
            llm.eval_prompt(list(j.tokens))
            state = llm.save_state()
            run(llm, "base " + (a.base or "(defaults)"), t0)
        for v in a.variant:
            t0 = time.perf_counter()
            with Llama(cfg.model, **common, **{**base, **parse_variant(v)}) as llm:
                llm.load_state(state)
                run(llm, v or "(base, replayed)", t0)
        for v in a.full:
            t0 = time.perf_counter()
            with Llama(cfg.model, **common, **{**base, **parse_variant(v)}) as llm:
                run(llm, "full " + v, t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
