"""`tca-ggml serve` / `python -m tca_ggml.server`: an OpenAI-compatible server over tca_ggml.Llama.

    tca-ggml serve -m MODEL.gguf [--host 127.0.0.1] [--port 8000] [--parallel N] [--n-ctx N]
                   [--tca | --tca-density X] [--n-gpu-layers N] [--threads N] [--alias NAME]
                   [--chat-format chatml] [--api-key KEY]

The model is loaded once into one context of N sequences: each of the N parallel slots is a
sequence (with TCA, its own budgeted retention memory), with its own worker thread and prefix
cache; the slots' decode steps are batched into one llama_decode (continuous batching); requests
beyond N wait in a FIFO queue. Endpoints: /v1/models, /v1/completions, /v1/chat/completions
(SSE streaming), /health, /metrics. Needs the `server` extra: pip install 'tca_ggml[server]'.
See docs/serving.md.
"""
from __future__ import annotations

import argparse
import os
import sys

_MISSING = ("the server needs FastAPI, uvicorn and sse-starlette (the `server` extra): "
            "pip install 'tca_ggml[server]'")


def add_model_arguments(ap: argparse.ArgumentParser, n_ctx: int = 4096) -> None:
    """The model, context and TCA options that serve, run and chat share (-> llama_kwargs)."""
    ap.add_argument("-m", "--model", required=True, help="GGUF model (calibrated or not)")
    ap.add_argument("-c", "--n-ctx", type=int, default=n_ctx, help="context size in tokens (0: the model's)")
    ap.add_argument("-b", "--n-batch", type=int, default=512)
    ap.add_argument("-ub", "--n-ubatch", type=int, default=512)
    ap.add_argument("-t", "--threads", type=int, default=None, help="decode threads")
    ap.add_argument("-tb", "--threads-batch", type=int, default=None, help="prompt threads")
    ap.add_argument("-ngl", "--n-gpu-layers", type=int, default=0)
    ap.add_argument("-fa", "--flash-attn", action="store_true")
    ap.add_argument("--seed", type=int, default=None, help="sampling seed")
    ap.add_argument("--chat-format", default=None,
                    help="a llama.cpp built-in chat template name (e.g. chatml) instead of the GGUF's")
    t = ap.add_argument_group("TCA (docs/design.md)")
    t.add_argument("--tca", action="store_true", help="TCA attention with the GGUF's calibrated budgets")
    t.add_argument("--tca-density", type=float, default=None,
                   help="TCA with a forced uniform density (uncalibrated; implies --tca)")
    t.add_argument("--tca-window", type=int, default=None)
    t.add_argument("--tca-block", type=int, default=None)
    t.add_argument("--tca-retention", choices=["hold", "stream"], default=None)
    t.add_argument("--tca-prefill", choices=["sparse", "dense", "early"], default=None)
    ap.add_argument("-v", "--verbose", action="store_true", help="llama.cpp's log (and the server's access log)")


def add_arguments(ap: argparse.ArgumentParser) -> None:
    add_model_arguments(ap)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("-np", "--parallel", type=int, default=1,
                    help="parallel slots: sequences of one context (each --n-ctx tokens), their decode steps "
                         "batched into one graph")
    ap.add_argument("-a", "--alias", default=None, help="the model's name in the API (default: the file's stem)")
    ap.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")


def llama_kwargs(a) -> dict:
    """Llama(...) arguments of parsed serve/run/chat options (the options they share)."""
    kw = dict(n_ctx=a.n_ctx, n_batch=a.n_batch, n_ubatch=a.n_ubatch, n_threads=a.threads,
              n_threads_batch=a.threads_batch, n_gpu_layers=a.n_gpu_layers, flash_attn=a.flash_attn,
              verbose=a.verbose, chat_format=a.chat_format)
    if a.seed is not None:
        kw["seed"] = a.seed % (1 << 32)
    tca = a.tca or a.tca_density is not None
    if tca:
        kw["tca"] = True
        for key, v in (("tca_density", a.tca_density), ("tca_window", a.tca_window), ("tca_block", a.tca_block),
                       ("tca_retention", a.tca_retention), ("tca_prefill", a.tca_prefill)):
            if v is not None:
                kw[key] = v
    elif any(v is not None for v in (a.tca_window, a.tca_block, a.tca_retention, a.tca_prefill)):
        raise ValueError("--tca-window/--tca-block/--tca-retention/--tca-prefill need --tca or --tca-density")
    return kw


def main_cli(a) -> int:
    try:
        import uvicorn
        from .app import create_app
    except ImportError as e:
        print(f"error: {_MISSING} ({e})", file=sys.stderr)
        return 2
    from .engine import Engine
    if not os.path.exists(a.model):
        print(f"error: model not found: {a.model}", file=sys.stderr)
        return 2
    if a.parallel < 1 or not 0 <= a.port <= 65535:
        print("error: --parallel must be >= 1 and --port in [0, 65535]", file=sys.stderr)
        return 2
    from ..errors import TCAError
    # one context for all slots: Llama's defaults (half the cores to decode, all of them to prefill)
    try:
        engine = Engine(a.model, parallel=a.parallel, alias=a.alias, **llama_kwargs(a))
    except (TCAError, ValueError, TypeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        print(f"tca-ggml serve: {engine.alias} ({a.model}), {a.parallel} slot(s) x n_ctx {engine.n_ctx}, "
              f"attention: {engine.tca_label}; http://{a.host}:{a.port}/v1", file=sys.stderr, flush=True)
        app = create_app(engine, api_key=a.api_key)
        uvicorn.run(app, host=a.host, port=a.port, log_level="info" if a.verbose else "warning",
                    access_log=a.verbose, timeout_graceful_shutdown=5)
    finally:
        engine.close()
    return 0


def main(argv=None) -> int:
    """`python -m tca_ggml.server ARGS` is `tca-ggml serve ARGS`: one parser, one error path."""
    from ..cli import main as cli_main
    return cli_main(["serve", *(sys.argv[1:] if argv is None else argv)])
