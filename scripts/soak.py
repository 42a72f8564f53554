#!/usr/bin/env python3
"""Soak checks of one process (issue 17; figures in docs/reliability.md "Soak"):

    .venv/bin/python scripts/soak.py decode    [--tokens 100000]   # TCA compacting, RSS flat
    .venv/bin/python scripts/soak.py cycles    [--cycles 200]      # create/close, no growth
    .venv/bin/python scripts/soak.py interrupt [--rounds 20]       # Ctrl-C during generation

Each prints one JSON line with its figures and exits 1 when its bound is broken (tests/test_soak.py
runs them, smaller). The model is the tiny random GGUF of tca_ggml.random_model ("tiny": 2 layers,
128 wide, 512-token byte-level vocabulary, f32), written once to --model (default: a temporary
file). TCA runs with a forced density 0.25, block 16 and window 32, so that it compacts every
16 tokens after the first 48.

decode: greedy generation, restarted with a new prompt when it stops (end of generation or a full
context, n_ctx 2048), until --tokens tokens were decoded. The resident set size (/proc/self/statm)
is sampled every 1,000 tokens; after --warmup tokens it must stay within 5% of its value then.
cycles: --cycles times Llama(...) with TCA, a 16-token generation, close(). RSS and virtual size
after the warm-up cycles and at the end: growth within 5%; no more open file descriptors.
interrupt: a thread sends SIGINT to the process while the main thread generates (after a random
delay); the KeyboardInterrupt must reach the caller, and afterwards the instance's token list
must match its cache, and the next completions must equal a fresh instance's: another prompt,
and the interrupted one again when the interrupt came during its prefill (its cached prefix is
reused; after generated tokens were compacted into the cache, truncating back is TCA's
approximation, interrupted or not).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time

from tca_ggml import Llama, random_model

KW = dict(n_ctx=2048, n_batch=64, n_ubatch=64, n_threads=1, n_threads_batch=1, verbose=False,
          tca=True, tca_density=0.25, tca_block=16, tca_window=32)
WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray yankee zulu").split()


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def vm_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def n_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def model_path(arg) -> str:
    if arg and os.path.exists(arg):
        return arg
    path = arg or os.path.join(tempfile.mkdtemp(prefix="tca_soak_"), "tiny.gguf")
    random_model.write_random_gguf(path, "tiny", wtype="f32", seed=3)
    return path


def prompt(i: int) -> str:
    w = WORDS[i % len(WORDS)]
    return f"{w} said the quick brown fox jumps over the lazy dog {i}. "


def soak_decode(a) -> dict:
    llm = Llama(model_path(a.model), **KW)
    t0, n, i, restarts = time.perf_counter(), 0, 0, 0
    samples, base = [], None
    next_sample = 1000
    compactions = 0
    while n < a.tokens:
        toks = llm.tokenize(prompt(i))
        i += 1
        restarts += 1
        for _ in llm.generate_tokens(toks, a.tokens - n, temperature=0):
            n += 1
            if n >= next_sample:
                next_sample += 1000
                r = rss_mb()
                if n >= a.warmup:
                    if base is None:
                        base = r
                    samples.append(r)
        compactions += llm.tca_stats()["n_compactions"]
        llm.reset()  # the next prompt starts a new sequence
    dt = time.perf_counter() - t0
    st = llm.tca_stats()
    llm.close()
    peak = max(samples) if samples else float("nan")
    out = {"check": "decode", "tokens": n, "seconds": round(dt, 1), "tokens_per_s": round(n / dt, 1),
           "sequences": restarts, "compactions_last_sequence": st["n_compactions"],
           "rss_after_warmup_mb": round(base, 1) if base else None, "rss_max_mb": round(peak, 1),
           "rss_min_mb": round(min(samples), 1) if samples else None, "rss_last_mb": round(samples[-1], 1) if samples else None,
           "growth": round(peak / base - 1, 4) if base else None, "n_samples": len(samples)}
    out["ok"] = bool(base) and peak <= base * 1.05
    return out


def soak_cycles(a) -> dict:
    path = model_path(a.model)
    rs, vms, fds = [], [], []
    t0 = time.perf_counter()
    for c in range(a.cycles):
        llm = Llama(path, **dict(KW, n_ctx=512))
        llm(prompt(c), max_tokens=16, temperature=0)
        llm.close()
        del llm
        rs.append(rss_mb())
        vms.append(vm_mb())
        fds.append(n_fds())
    warm = min(a.warmup_cycles, a.cycles - 1)
    base, end, peak = rs[warm], rs[-1], max(rs[warm:])
    out = {"check": "cycles", "cycles": a.cycles, "seconds": round(time.perf_counter() - t0, 1),
           "rss_first_mb": round(rs[0], 1), "rss_after_warmup_mb": round(base, 1), "rss_last_mb": round(end, 1),
           "rss_max_mb": round(peak, 1), "growth": round(end / base - 1, 4),
           "vm_after_warmup_mb": round(vms[warm], 1), "vm_last_mb": round(vms[-1], 1),
           "fds_after_warmup": fds[warm], "fds_last": fds[-1]}
    # no growth: resident and virtual size (a leaked mapping of the model) within 5%, no open file left
    out["ok"] = end <= base * 1.05 and peak <= base * 1.05 and vms[-1] <= vms[warm] * 1.05 and fds[-1] <= fds[warm]
    return out


def soak_interrupt(a) -> dict:
    path = model_path(a.model)
    kw = dict(KW, n_ctx=1024)
    llm = Llama(path, **kw)
    fresh = Llama(path, **kw)
    rng = random.Random(a.seed)
    L = llm._L
    res = {"check": "interrupt", "rounds": a.rounds, "interrupted": 0, "finished_first": 0, "in_prefill": 0,
           "in_generation": 0, "after": 0, "consistent": 0,
           "same_text": 0, "failures": []}
    # the interrupt lands at a random moment of a call: a thread waits until the instance holds a
    # random number of tokens (in the prompt's prefill or in the generation), then sends SIGINT,
    # which Python delivers at some later bytecode. (Delays in seconds made the check depend on the
    # machine's speed and load.)
    def interrupter(target: int, done: threading.Event) -> None:
        armed = False   # first the call cuts the previous round's tokens (they share only the BOS)
        while not done.is_set():
            n = len(llm._tokens)
            armed = armed or n < target
            if armed and n >= target:
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.0002)

    for r in range(a.rounds):
        n_prompt = len(llm.tokenize(prompt(r) * 8))
        done = threading.Event()
        timer = threading.Thread(target=interrupter, args=(rng.randint(2, n_prompt + 40), done))
        got_ki = False
        timer.start()
        try:
            try:
                llm(prompt(r) * 8, max_tokens=600, temperature=0)
            except KeyboardInterrupt:
                got_ki = True
            done.set()
            timer.join()
        except KeyboardInterrupt:   # the signal came after the call ended
            got_ki = False
        res["interrupted" if got_ki else "finished_first"] += 1
        n_cached = L.llama_memory_seq_pos_max(L.llama_get_memory(llm._ctx), 0) + 1
        if n_cached == len(llm._tokens):
            res["consistent"] += 1
        else:
            res["failures"].append(f"round {r}: cache holds {n_cached} tokens, the instance thinks {len(llm._tokens)}")
        # the interrupted prompt again (its cached prefix is reused), then another one. A prompt
        # re-evaluated on a prefix of itself gives what a fresh instance gives, so the first is
        # compared when the interrupt came during its prefill; once generated tokens were compacted
        # into the cache, truncating back to the prompt is TCA's approximation (the same without
        # any interrupt), so then only the second prompt (sharing the BOS only) is compared.
        in_prefill = len(llm._tokens) <= len(llm.tokenize(prompt(r) * 8))
        res["in_prefill" if got_ki and in_prefill else "in_generation" if got_ki else "after"] += 1
        same = 0
        for p in ((prompt(r) * 8,) if in_prefill else ()) + (prompt(1000 + r),):
            try:
                got = llm(p, max_tokens=16, temperature=0)["choices"][0]["text"]
            except Exception as e:  # noqa: BLE001 - reported
                got = f"<{type(e).__name__}: {e}>"
            fresh.reset()
            want = fresh(p, max_tokens=16, temperature=0)["choices"][0]["text"]
            if got == want:
                same += 1
            else:
                res["failures"].append(f"round {r}: after the interrupt {got!r}, a fresh instance {want!r}")
        res["same_text"] += same == (2 if in_prefill else 1)
    res["ok"] = res["consistent"] == a.rounds and res["same_text"] == a.rounds and res["interrupted"] > 0
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("check", choices=("decode", "cycles", "interrupt"))
    ap.add_argument("--model", help="the tiny random model (written there when missing)")
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--warmup", type=int, default=10_000, help="decode: tokens before the RSS baseline")
    ap.add_argument("--cycles", type=int, default=200)
    ap.add_argument("--warmup-cycles", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    out = {"decode": soak_decode, "cycles": soak_cycles, "interrupt": soak_interrupt}[a.check](a)
    print(json.dumps(out), flush=True)
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
