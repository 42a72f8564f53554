#!/usr/bin/env python3
"""TCA over ggml RPC vs local, side by side (issue 18's GPU acceptance; docs/design.md "RPC").

    python3 scripts/gpu/rpc_bench.py --model /tmp/l1b.gguf --server build/cuda/tca-rpc-server \
        [--device CUDA0] [--prompt 32768] [--gen 32] [--density 0.1] [--dense] [--json out.json]

Starts the rpc-server (tca-rpc-server: upstream's tools/rpc/rpc-server.cpp linked to libtca_ggml) on
127.0.0.1 with one device (-d; --device '' lets the server choose: its accelerators, else the CPU), then
runs, each in a fresh Llama on the same tokens (BOS + the essays, cut to --prompt tokens):

  tca-local   n_gpu_layers=99, this machine's backend (CUDA here on the GPU machine, else the CPU)
  tca-rpc     n_gpu_layers=99 on the rpc-server (every layer and the TCA retention buffers there)
  (--dense: dense-local and dense-rpc, tca=False: upstream's cache over RPC beside it)

After an untimed warm-up (--warmup tokens and one step, then an empty cache), the prefill is timed
(TTFT, to the first token's logits), then --gen greedy decode steps one by one. For the RPC arms the client's
counters (tca_rpc_get_stats, patch 0006) are read around the prefill and after every decode step:
round trips (commands that wait for the server's answer) and payload bytes per step. Decode t/s:
all steps; steady: without the first (the prompt's final selection); post-hold: the steps after the
first hold_decode ones (those attend every held row; TCA's sparse decode after them). Prints a
markdown table and "tokens identical: ..."; --json writes every number and the greedy token lists.
Exit status: 0 same TCA tokens, 1 TCA tokens differ, 2 error (server, load), 3 TCA inactive in an arm.

Both TCA arms get tca_hold_decode=--hold-decode (32: a GPU's default; a remote layer otherwise takes
the CPU's default, every step, so the arms would run different configurations). --gpu-min-ctx sets
TCA_GGML_GPU_MIN_CTX (an RPC device counts as a GPU: contexts <= 8192 keep the dense cache); a short
CPU check needs 0 and a --tca-window below n_ctx.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time


class Server:
    """tca-rpc-server on 127.0.0.1:port, killed by stop() (also on errors: used as a context manager)."""

    def __init__(self, path, port, device, threads, log_path=None, timeout=60.0):
        self.port = port
        self.endpoint = f"127.0.0.1:{port}"
        self.log_path = log_path or tempfile.mkstemp(prefix="rpc_server_", suffix=".log")[1]
        self.log = open(self.log_path, "wb")
        cmd = [path, "-H", "127.0.0.1", "-p", str(port)]
        if device:
            cmd += ["-d", device]
        if threads:
            cmd += ["-t", str(threads)]
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        t0 = time.monotonic()
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"rpc-server exited with {self.proc.returncode}: {self.tail()}")
                try:
                    # a bare connect, no HELLO: the server drops it and accepts the next client
                    socket.create_connection(("127.0.0.1", port), 0.2).close()
                    break
                except OSError:
                    if time.monotonic() - t0 > timeout:
                        raise RuntimeError(f"rpc-server did not listen on {self.endpoint} within {timeout:.0f} s: "
                                           f"{self.tail()}")
                    time.sleep(0.05)
        except BaseException:
            self.stop()
            raise
        self.t_start = time.monotonic() - t0

    def tail(self, n=2000) -> str:
        try:
            self.log.flush()
            with open(self.log_path, "rb") as f:
                return f.read().decode(errors="replace")[-n:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def _die_with_parent():
    # Linux: the server gets SIGKILL when this process dies, however it dies (prctl PR_SET_PDEATHSIG)
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)
    except Exception:
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rpc_stats(llm, endpoint):
    st = llm._ffi.new("struct tca_rpc_stats *")
    if llm._L.tca_rpc_get_stats(endpoint.encode(), st) != 0:
        raise RuntimeError("tca_rpc_get_stats failed (library built without RPC?)")
    return {"rt": int(st.n_round_trips), "cmds": int(st.n_cmds), "sent": int(st.bytes_sent),
            "recv": int(st.bytes_recv), "fail": int(st.n_failures)}


def _delta(a, b):
    return {k: b[k] - a[k] for k in a}


def prompt_tokens(a):
    """BOS + the essays (texts.haystack), cut to a.prompt tokens, with the model's own vocabulary."""
    from tca_ggml import texts
    from tca_ggml.llama import Llama
    with Llama(a.model, vocab_only=True, verbose=False) as v:
        toks = v.tokenize(texts.haystack(a.prompt * 6).encode(), add_bos=True)
    if len(toks) < a.prompt:
        raise SystemExit(f"error: the text gives {len(toks)} tokens, fewer than --prompt {a.prompt}")
    return toks[: a.prompt]


def run_arm(a, name, tca, endpoint, toks, n_ctx) -> dict:
    from tca_ggml.llama import Llama
    kw = dict(n_ctx=n_ctx, n_batch=a.batch, n_ubatch=a.batch, n_threads=a.threads, n_threads_batch=a.threads,
              flash_attn=bool(a.fa), n_gpu_layers=a.n_gpu_layers, verbose=False, tca=tca)
    if tca:
        kw.update(tca_density=a.density, tca_hold_decode=a.hold_decode)
        if a.tca_window is not None:
            kw["tca_window"] = a.tca_window
        if a.tca_block is not None:
            kw["tca_block"] = a.tca_block
    if endpoint:
        kw["rpc_servers"] = endpoint
    print(f"[rpc_bench] {name}: loading (n_ctx {n_ctx}{', rpc ' + endpoint if endpoint else ''})", file=sys.stderr)
    t_load = time.perf_counter()
    llm = Llama(a.model, **kw)
    try:
        t_load = time.perf_counter() - t_load
        stats = (lambda: _rpc_stats(llm, endpoint)) if endpoint else (lambda: None)
        if a.warmup:
            # untimed, uncounted: a short prompt and one step (first-use costs: kernels, buffers,
            # mmap'd weights), then an empty cache
            w = min(a.warmup, len(toks))
            llm._decode(toks[:w], 0)
            llm._decode([int(llm._logits_last().argmax())], w)
            llm.reset()
        s0 = stats()
        t0 = time.perf_counter()
        llm._decode(toks, 0)
        tok = int(llm._logits_last().argmax())
        ttft = time.perf_counter() - t0
        s1 = stats()
        out, step_s, step_rpc = [tok], [], []
        sp = s1
        td = time.perf_counter()
        for _ in range(a.gen):
            ts = time.perf_counter()
            llm._decode([tok], len(llm._tokens))
            tok = int(llm._logits_last().argmax())
            step_s.append(time.perf_counter() - ts)
            out.append(tok)
            if endpoint:
                sn = stats()                  # outside the step's timed window
                step_rpc.append(_delta(sp, sn))
                sp = sn
        t_dec = time.perf_counter() - td
        st = llm.tca_stats() if tca else {"active": False}
        res = {"arm": name, "tca": tca, "density": a.density if tca else None, "rpc": bool(endpoint), "label": llm.tca_label if tca else "dense",
               "active": bool(st.get("active")), "n_ctx": llm.n_ctx(), "load_s": t_load, "ttft_s": ttft,
               "prefill_tps": len(toks) / ttft, "gen": len(out), "tokens": out, "step_s": step_s,
               "decode_tps": len(step_s) / sum(step_s) if step_s else 0.0,
               "decode_steady_tps": (len(step_s) - 1) / sum(step_s[1:]) if len(step_s) > 1 else 0.0,
               "decode_wall_s": t_dec, "post_hold_tps": None}
        if tca and st.get("active"):
            hd = st.get("hold_decode")
            res.update(hold_decode=hd, rows_kept=st.get("rows_kept"),
                       kv_fast_bytes=st.get("bytes_fast"), kv_dense_bytes=st.get("bytes_dense"))
            # the steps after the hold-decode ones (those attend every held row): sparse decode
            if hd is not None and 0 <= hd < len(step_s):
                res["post_hold_tps"] = (len(step_s) - hd) / sum(step_s[hd:])
        if endpoint:
            pre = _delta(s0, s1)
            rts = [d["rt"] for d in step_rpc]
            n = max(1, len(step_rpc))
            res.update(prefill_rpc=pre, step_rpc=step_rpc, rt_per_step=rts,
                       rt_step_median=statistics.median(rts) if rts else 0, rt_step_mean=sum(rts) / n,
                       rt_step_max=max(rts) if rts else 0,
                       sent_per_step=sum(d["sent"] for d in step_rpc) / n,
                       recv_per_step=sum(d["recv"] for d in step_rpc) / n,
                       cmds_per_step=sum(d["cmds"] for d in step_rpc) / n,
                       rpc_failures=stats()["fail"])
        print(f"[rpc_bench] {name}: {res['label']} active={res['active']} TTFT {ttft:.3f} s, "
              f"decode {res['decode_tps']:.2f} t/s", file=sys.stderr)
        return res
    finally:
        llm.close()


def first_diff(x, y):
    for i, (p, q) in enumerate(zip(x, y)):
        if p != q:
            return i
    return None if len(x) == len(y) else min(len(x), len(y))


def _kib(b):
    return f"{b / 1024:.1f} KiB"


def table(rows) -> str:
    lines = ["| arm | attention | TTFT s | prefill t/s | decode t/s | steady t/s | post-hold t/s | round trips/step (median / mean / max) "
             "| sent/step | recv/step | prefill round trips | prefill sent / recv |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        att = f"TCA p={r['density']:g}" if r["tca"] else "dense"
        if r["tca"] and not r["active"]:
            att += " (INACTIVE: dense cache)"
        if r["rpc"]:
            p = r["prefill_rpc"]
            rpc = (f"{r['rt_step_median']:g} / {r['rt_step_mean']:.2f} / {r['rt_step_max']} | {_kib(r['sent_per_step'])} | "
                   f"{_kib(r['recv_per_step'])} | {p['rt']} | {p['sent'] / 2**20:.1f} / {p['recv'] / 2**20:.2f} MiB")
        else:
            rpc = "- | - | - | - | -"
        ph = "-" if r["post_hold_tps"] is None else f"{r['post_hold_tps']:.2f}"
        lines.append(f"| {r['arm']} | {att} | {r['ttft_s']:.3f} | {r['prefill_tps']:.0f} | {r['decode_tps']:.2f} | "
                     f"{r['decode_steady_tps']:.2f} | {ph} | {rpc} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", "-m", required=True)
    ap.add_argument("--prompt", "-p", type=int, default=32768, help="prompt tokens (BOS + essays)")
    ap.add_argument("--gen", "-n", type=int, default=32,
                    help="timed greedy decode steps (after the prompt's own token: gen + 1 tokens compared)")
    ap.add_argument("--density", type=float, default=0.1, help="forced TCA density (tca_density)")
    ap.add_argument("--hold-decode", type=int, default=32,
                    help="tca_hold_decode of both TCA arms (32: a GPU's default; -2: each arm's own default)")
    ap.add_argument("--tca-window", type=int, default=None)
    ap.add_argument("--tca-block", type=int, default=None)
    ap.add_argument("--gpu-min-ctx", type=int, default=None, help="set TCA_GGML_GPU_MIN_CTX (0 for short CPU checks)")
    ap.add_argument("--port", type=int, default=0, help="rpc-server port (0: a free one)")
    ap.add_argument("--server", default=None,
                    help="tca-rpc-server path (default: $TCA_GGML_RPC_SERVER, else the package's bin/tca-rpc-server)")
    ap.add_argument("--device", default="CUDA0", help="the server's device (-d): CUDA0, CPU; '' lets the server choose")
    ap.add_argument("--server-log", default=None, help="the server's stdout/stderr (default: a temp file)")
    ap.add_argument("--server-timeout", type=float, default=60.0, help="seconds to wait for the server to listen")
    ap.add_argument("--batch", type=int, default=2048, help="n_batch = n_ubatch")
    ap.add_argument("--threads", type=int, default=None, help="client threads, and the server's -t")
    ap.add_argument("--n-gpu-layers", type=int, default=99)
    ap.add_argument("--fa", type=int, default=1, help="flash_attn of every arm (a dense arm's attention; active TCA ignores it)")
    ap.add_argument("--warmup", type=int, default=256,
                    help="tokens of an untimed warm-up prompt (+ one step) before each arm's timed run (0: none)")
    ap.add_argument("--dense", action="store_true", help="also the dense pair (tca=False): local and over RPC")
    ap.add_argument("--json", default=None, help="write the results (tables' numbers, tokens, per-step data) here")
    a = ap.parse_args(argv)
    if a.gen < 2:
        ap.error("--gen must be at least 2")
    # `timeout` sends SIGTERM: leave through the finally blocks (the server is killed, the JSON written)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))
    if a.gpu_min_ctx is not None:
        os.environ["TCA_GGML_GPU_MIN_CTX"] = str(a.gpu_min_ctx)   # read at each context's creation

    if a.server is None:
        from tca_ggml.errors import NativeLibraryError
        from tca_ggml.rpc_server import server_path
        try:
            a.server = str(server_path())
        except NativeLibraryError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    if not os.path.isfile(a.server):
        print(f"error: rpc-server not found at {a.server} (build target tca-rpc-server)", file=sys.stderr)
        return 2
    n_ctx = (a.prompt + a.gen + 64 + 255) // 256 * 256
    port = a.port or _free_port()
    rows, rc = [], 0
    try:
        toks = prompt_tokens(a)
        with Server(a.server, port, a.device, a.threads, a.server_log, a.server_timeout) as srv:
            print(f"[rpc_bench] rpc-server {' '.join(srv.cmd)} listening after {srv.t_start:.1f} s "
                  f"(log {srv.log_path})", file=sys.stderr)
            arms = [("tca-local", True, None), ("tca-rpc", True, srv.endpoint)]
            if a.dense:
                arms += [("dense-local", False, None), ("dense-rpc", False, srv.endpoint)]
            for name, tca, ep in arms:
                try:
                    rows.append(run_arm(a, name, tca, ep, toks, n_ctx))
                except Exception as e:
                    print(f"error: arm {name}: {type(e).__name__}: {e}", file=sys.stderr)
                    if ep:
                        print(f"rpc-server {'alive' if srv.alive() else 'exited'}; its log:\n{srv.tail()}",
                              file=sys.stderr)
                    return 2
    except Exception as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    finally:
        if rows and a.json:
            with open(a.json, "w") as f:
                json.dump({"model": a.model, "prompt": a.prompt, "gen": a.gen, "density": a.density,
                           "hold_decode": a.hold_decode, "n_ctx": n_ctx, "device": a.device, "batch": a.batch,
                           "threads": a.threads, "fa": a.fa, "arms": rows}, f, indent=1)

    by = {r["arm"]: r for r in rows}
    print(f"RPC vs local: prompt {a.prompt}, gen {a.gen}, density {a.density}, hold_decode {a.hold_decode}, "
          f"n_ctx {n_ctx}, server device {a.device or '(default)'}, batch {a.batch}\n")
    labels = sorted({r["label"] for r in rows if r["tca"]})
    if labels:
        print("TCA: " + "; ".join(labels) + "\n")
    print(table(rows))
    print()
    for kind in ("tca", "dense"):
        if f"{kind}-local" not in by:
            continue
        x, y = by[f"{kind}-local"]["tokens"], by[f"{kind}-rpc"]["tokens"]
        i = first_diff(x, y)
        print(f"{kind} tokens identical: " + ("yes" if i is None else f"no (first difference at {i})") +
              f" ({len(x)} tokens)")
        if kind == "tca" and i is not None:
            rc = 1
    for name in ("tca-local", "tca-rpc"):
        if not by[name]["active"]:
            print(f"error: TCA inactive in arm {name} (dense cache: n_ctx <= window + block, or <= "
                  f"TCA_GGML_GPU_MIN_CTX on a GPU/RPC device)", file=sys.stderr)
            rc = rc or 3
    for name in ("tca-rpc", "dense-rpc"):
        if name in by and by[name].get("rpc_failures"):
            print(f"warning: {name}: {by[name]['rpc_failures']} RPC connection failures", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
