"""Decode step time of the calibrated default model after an L-token prompt, per TCA arm (environment
knobs such as TCA_GGML_RECALL), for the record in docs/benchmarks.md: the steps after the hold-decode
steps are what recall changes. Not a benchmark of TCA vs dense (that is `tca-ggml bench`); a dense arm
is timed the same way for scale.

    python scripts/analysis/decode_step_time.py MODEL L [--steps 64] [--threads 2] ARM...
    ARM: name=ENV=VALUE[,ENV=VALUE] or name=dense or name= (TCA, no knob)
"""
import argparse
import os
import time

import numpy as np

from tca_ggml import Llama, texts


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("length", type=int)
    ap.add_argument("arms", nargs="+")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    with Llama(a.model, vocab_only=True, verbose=False) as tok:
        toks = tok.tokenize(texts.haystack(a.length * 6).encode(), add_bos=True)[:a.length]
    for arm in a.arms:
        name, _, spec = arm.partition("=")
        env = {}
        dense = spec == "dense"
        if spec and not dense:
            for kv in spec.split(","):
                k, _, v = kv.partition("=")
                env[k] = v
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            kw = dict(n_ctx=a.length + a.steps + 64, n_batch=512, n_ubatch=512, n_threads=a.threads,
                      n_threads_batch=a.threads, verbose=False)
            if not dense:
                kw["tca"] = True
            with Llama(a.model, **kw) as llm:
                t0 = time.perf_counter()
                llm.eval_prompt(toks)
                ttft = time.perf_counter() - t0
                tok = int(llm._logits_last().argmax())
                hold = 0 if dense else int(llm.tca_stats()["hold_decode"] or 0)
                hold = min(max(hold, 0), 32)   # -1 or large (every step holds): all steps alike, none untimed beyond 32
                for _ in range(hold):      # the hold-decode steps: not timed
                    llm._decode([tok], len(llm._tokens))
                    tok = int(llm._logits_last().argmax())
                ts = []
                for _ in range(a.steps):
                    t = time.perf_counter()
                    llm._decode([tok], len(llm._tokens))
                    tok = int(llm._logits_last().argmax())
                    ts.append(time.perf_counter() - t)
            print(f"{name:12s} L={a.length} prefill {ttft:7.1f} s  step median {np.median(ts) * 1e3:6.1f} ms "
                  f"mean {np.mean(ts) * 1e3:6.1f} ms ({a.steps} steps after {hold} hold-decode steps)", flush=True)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


if __name__ == "__main__":
    main()
