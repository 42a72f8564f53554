"""The main job on the default model: answer a question about a long document, TCA and dense
attention side by side.

    python -m tca_ggml.demo [--model NAME_OR_PATH] [--tokens 8000] [--depth 0.3] [--arms dense,tca]

A fact is planted in ~8K tokens of Paul Graham's essays (long enough that TCA evicts: its window
is 4096 tokens); the model is asked for it through its chat template, once with upstream's dense
attention and once with TCA (the calibrated budgets). The first run calibrates the model once
(`tca-ggml calibrate`, a progress bar, a few minutes on 2 cores) and caches the calibrated GGUF
next to it (<model>.tca<ctx>.gguf); a GGUF that is already calibrated is used as it is. Prints a
table: the answer, whether it is correct, time to first token, decode speed and KV memory.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from . import models, texts
from .errors import TCAError

NEEDLE = "Important note: the secret code for the lighthouse archive is 7391-BLUE-HARBOR."
QUESTION = "What is the secret code for the lighthouse archive? Reply with the code only."
ANSWER = "7391-BLUE-HARBOR"


def calibrated_path(path: str, ctx: int, window: int, block: int) -> str:
    """The calibrated GGUF to use for `path`: itself when it already has tca.* budgets, else the
    cached copy next to it, calibrated now if it is not there yet."""
    from . import calibrate
    from .gguf_meta import read_budgets
    if read_budgets(path, check_model=False) is not None:
        return path
    stem = path[:-5] if path.endswith(".gguf") else path
    suffix = "" if (window, block) == (4096, 128) else f".w{window}b{block}"
    out = f"{stem}.tca{ctx // 1024}k{suffix}.gguf"
    if not os.path.exists(out):
        print(f"[demo] calibrating {os.path.basename(path)} once ({ctx} tokens, window {window}, block {block}) "
              f"-> {os.path.basename(out)}", file=sys.stderr)
        calibrate.calibrate(path, out, n_ctx=ctx, window=window, block=block, progress=True)
    return out


def run_arm(path: str, tca: bool, doc: str, n_ctx: int, threads) -> dict:
    from .llama import Llama
    with Llama(path, n_ctx=n_ctx, n_batch=512, n_threads=threads, n_threads_batch=threads,
               flash_attn=True, verbose=False, tca=tca) as llm:
        messages = [{"role": "system", "content": "You answer questions about the document exactly."},
                    {"role": "user", "content": f"Document:\n{doc}\n\nQuestion: {QUESTION}"}]
        out = llm.create_chat_completion(messages, temperature=0.0, max_tokens=24)
        ans = out["choices"][0]["message"]["content"].strip()
        t = llm.timings
        r = {"answer": ans, "correct": ANSWER.lower() in ans.lower(), "prompt_tokens": out["usage"]["prompt_tokens"],
             "ttft_s": t.prefill_s, "decode_tps": t.decode_tps, "decode_tokens": t.decode_tokens,
             "kv_mib": llm.memory_bytes()["kv"] / 2**20, "label": llm.tca_label}
        if tca:
            st = llm.tca_stats()
            r.update(fast_mib=st["bytes_fast"] / 2**20, hold_mib=st["bytes_hold"] / 2**20,
                     dense_mib=st["bytes_dense"] / 2**20, active=bool(st["active"]))
        return r


def print_table(arms: dict) -> None:
    d, t = arms.get("dense"), arms.get("tca")
    cols = [k for k in ("dense", "tca") if k in arms]
    head = {"dense": "dense (upstream)", "tca": "TCA"}
    rows = [("answer", lambda r: r["answer"][:40]),
            ("correct", lambda r: "yes" if r["correct"] else "NO"),
            ("time to first token", lambda r: f"{r['ttft_s']:.1f} s"),
            ("decode", lambda r: f"{r['decode_tps']:.1f} tokens/s"),
            ("KV memory", lambda r: f"{r['kv_mib']:.0f} MiB" if "fast_mib" not in r else
             f"{r['fast_mib']:.0f} MiB kept + {r['hold_mib']:.0f} MiB hold tier")]
    if d and t:
        rows.append(("TCA vs dense", None))
    w0 = max(len(r[0]) for r in rows)
    w = max(42, *(len(head[c]) for c in cols))
    print(f"{'':{w0}} | " + " | ".join(f"{head[c]:{w}}" for c in cols))
    print("-" * w0 + "-+-" + "-+-".join("-" * w for _ in cols))
    for name, f in rows:
        if f is None:
            ratio = (f"TTFT {d['ttft_s'] / t['ttft_s']:.2f}x, decode {t['decode_tps'] / d['decode_tps']:.2f}x, "
                     f"kept KV {t['fast_mib'] / t['dense_mib']:.2f} of dense")
            print(f"{name:{w0}} | {ratio}")
            continue
        print(f"{name:{w0}} | " + " | ".join(f"{f(arms[c]):{w}}" for c in cols))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tca_ggml.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=models.DEFAULT_MODEL, help="a known model name or a GGUF path")
    ap.add_argument("--tokens", type=int, default=8000, help="approximate document length in tokens")
    ap.add_argument("--depth", type=float, default=0.3, help="where the fact is planted (0..1)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--arms", default="dense,tca", help="which to run: dense, tca or both (dense,tca)")
    ap.add_argument("--calib-ctx", type=int, default=8192, help="calibration length (calibrate at the length you serve)")
    ap.add_argument("--tca-window", type=int, default=4096, help="TCA's local window (calibration)")
    ap.add_argument("--tca-block", type=int, default=128, help="TCA's block size (calibration)")
    ap.add_argument("--tca", action="store_true", help="TCA only (the same as --arms tca)")
    a = ap.parse_args(argv)
    arms = ["tca"] if a.tca else [x.strip() for x in a.arms.split(",") if x.strip()]
    if not arms or any(x not in ("dense", "tca") for x in arms):
        print(f"error: --arms takes dense, tca or both, got {a.arms!r}", file=sys.stderr)
        return 1
    if not 0 <= a.depth <= 1:
        print(f"error: --depth must be in [0, 1], got {a.depth}", file=sys.stderr)
        return 1
    try:
        path = a.model if os.path.exists(a.model) else str(models.fetch(a.model))
        doc = texts.plant(texts.haystack(a.tokens * 4), NEEDLE, a.depth)
        n_ctx = int(a.tokens * 1.3) + 512
        tca_path = calibrated_path(path, a.calib_ctx, a.tca_window, a.tca_block) if "tca" in arms else None
        res = {}
        for arm in arms:
            t0 = time.perf_counter()
            res[arm] = run_arm(tca_path if arm == "tca" else path, arm == "tca", doc, n_ctx, a.threads)
            print(f"[demo] {arm}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        any_r = next(iter(res.values()))
        print(f"model      : {os.path.basename(path)}" + (f" (TCA budgets: {os.path.basename(tca_path)})" if tca_path else ""))
        print(f"document   : {any_r['prompt_tokens']} prompt tokens, fact at {a.depth:.0%} depth")
        print(f"question   : {QUESTION}  (expected {ANSWER})\n")
        print_table(res)
        if "tca" in res and not res["tca"]["active"]:
            print("\nnote: TCA was not active (the context is not longer than its window + block)")
        return 0 if all(r["correct"] for r in res.values()) else 2
    except TCAError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
