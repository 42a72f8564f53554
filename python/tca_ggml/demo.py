"""The main job on the default model: answer a question about a long document.

    python -m tca_ggml.demo [--model NAME_OR_PATH] [--tokens 6000] [--depth 0.6] [--tca]

A fact is planted in several thousand tokens of Paul Graham's essays; the model is
asked for it through its chat template. Prints the answer, whether it is correct,
prefill and decode speed, and the KV-cache memory.
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tca_ggml.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=models.DEFAULT_MODEL, help="a known model name or a GGUF path")
    ap.add_argument("--tokens", type=int, default=6000, help="approximate document length in tokens")
    ap.add_argument("--depth", type=float, default=0.6, help="where the fact is planted (0..1)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--tca", action="store_true", help="use TCA (needs a calibrated GGUF)")
    a = ap.parse_args(argv)
    from .llama import Llama
    try:
        path = a.model if os.path.exists(a.model) else str(models.fetch(a.model))
        doc = texts.plant(texts.haystack(a.tokens * 4), NEEDLE, a.depth)
        n_ctx = int(a.tokens * 1.3) + 512
        with Llama(path, n_ctx=n_ctx, n_batch=512, n_threads=a.threads, n_threads_batch=a.threads,
                   flash_attn=True, verbose=False, tca=a.tca) as llm:
            messages = [{"role": "system", "content": "You answer questions about the document exactly."},
                        {"role": "user", "content": f"Document:\n{doc}\n\nQuestion: {QUESTION}"}]
            t0 = time.perf_counter()
            out = llm.create_chat_completion(messages, temperature=0.0, max_tokens=24)
            wall = time.perf_counter() - t0
            ans = out["choices"][0]["message"]["content"].strip()
            t = llm.timings
            mem = llm.memory_bytes()
            ok = ANSWER.lower() in ans.lower()
            print(f"model      : {os.path.basename(path)}")
            print(f"document   : {out['usage']['prompt_tokens']} prompt tokens, fact at {a.depth:.0%} depth")
            print(f"question   : {QUESTION}")
            print(f"answer     : {ans}")
            print(f"correct    : {'yes' if ok else 'NO'} (expected {ANSWER})")
            print(f"prefill    : {t.prompt_tokens} tokens in {t.prefill_s:.2f} s = {t.prefill_tps:.1f} tokens/s")
            print(f"decode     : {t.decode_tokens} tokens in {t.decode_s:.2f} s = {t.decode_tps:.1f} tokens/s")
            print(f"KV memory  : {mem['kv'] / 2**20:.1f} MiB for n_ctx={llm.n_ctx()} "
                  f"(model {mem['model'] / 2**20:.0f} MiB, compute {mem['compute'] / 2**20:.0f} MiB)")
            print(f"attention  : {'TCA' if a.tca else 'dense (upstream)'}; total {wall:.1f} s")
            return 0 if ok else 2
    except TCAError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
