"""The server under load (issue 17, docs/reliability.md "The server under load").

Starts `python -m tca_ggml.server` (a tiny random GGUF unless -m is given; TCA at a forced density
with a small window, so every request compacts) and runs C client threads for D seconds. Each
client loops over a random mix of requests, over raw HTTP (http.client), each with a 120 s socket
timeout:
  stream      a streamed completion read to its end ([DONE])
  chat        a non-streamed chat completion
  disconnect  a streamed completion closed after its first chunks (the slot must be freed)
  malformed   a body that is not JSON                       -> 400
  overlong    a prompt longer than the context              -> 400 context_length_exceeded
  unknown     an unknown model name                         -> 404
Nothing may be lost: every request gets its complete answer or its error; no client times out; the
server is alive at the end, idle (no busy slot, empty queue) within 30 s of the last request, and
its /metrics counters add up to what the clients saw (every stream and chat completed, every
disconnect completed or cancelled, rejected = the 4xx answers, none failed), with no traceback in
its log. One JSON line on stdout; exit 1 if a check failed.

    .venv/bin/python scripts/load_server.py --clients 12 --seconds 60 --parallel 4
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

MIX = (("stream", 35), ("chat", 20), ("disconnect", 15), ("malformed", 10), ("overlong", 10), ("unknown", 10))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r)


def metrics(url: str) -> dict:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("tca_ggml_") and "{" not in line.split()[0]:
            name, v = line.split()[:2]
            out[name[len("tca_ggml_"):]] = float(v)
    return out


def prompt(rng: random.Random) -> str:
    i = rng.randrange(1000)
    return f"{i} " + " ".join(f"w{(i * 37 + k * 11) % 97}" for k in range(rng.randint(40, 90)))


def one(port: int, kind: str, rng: random.Random, n_ctx: int) -> str:
    """One request of `kind`; returns the outcome ('ok', 'rejected', 'disconnected') or raises."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        if kind == "malformed":
            c.request("POST", "/v1/completions", body=b'{"prompt": "x", "max_tokens": ', headers={"Content-Type": "application/json"})
        else:
            if kind == "chat":
                path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": prompt(rng)}]}
            else:
                path, body = "/v1/completions", {"prompt": prompt(rng)}
            if kind == "overlong":
                body["prompt"] = " ".join(f"w{k % 97}" for k in range(n_ctx * 2))
            body.update(max_tokens=rng.randint(8, 40), temperature=0.8, seed=rng.randrange(1 << 30),
                        stream=kind in ("stream", "disconnect"))
            if kind == "unknown":
                body["model"] = "no-such-model"
            c.request("POST", path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        r = c.getresponse()
        if kind in ("malformed", "overlong", "unknown"):
            err = json.loads(r.read())
            want = 404 if kind == "unknown" else 400
            assert r.status == want and "error" in err and err["error"].get("message"), (kind, r.status, err)
            if kind == "overlong":
                assert err["error"].get("code") == "context_length_exceeded", err
            return "rejected"
        assert r.status == 200, (kind, r.status, r.read()[:500])
        if kind == "chat":
            res = json.loads(r.read())
            assert res["choices"][0]["finish_reason"] in ("stop", "length") and "tca" in res, res
            return "ok"
        n_data, done = 0, False
        while True:
            line = r.fp.readline()
            if not line:
                break
            if line.startswith(b"data: "):
                if line.strip() == b"data: [DONE]":
                    done = True
                    break
                json.loads(line[6:])
                n_data += 1
                if kind == "disconnect" and n_data >= 2:
                    c.sock.shutdown(socket.SHUT_RDWR)
                    return "disconnected"
        assert done and n_data >= 1, f"a stream ended without [DONE] after {n_data} chunks"
        return "ok"
    finally:
        c.close()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("-m", "--model", help="a GGUF (default: a tiny random one written to a temp dir)")
    ap.add_argument("--clients", type=int, default=12)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--n-ctx", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="tca_load_")
    model = a.model
    if model is None:
        from tca_ggml.random_model import write_random_gguf
        model = os.path.join(tmp, "tiny.gguf")
        write_random_gguf(model, "tiny", "f32", seed=5)
    port = free_port()
    log_path = os.path.join(tmp, "server.log")
    log = open(log_path, "wb")
    srv = subprocess.Popen([sys.executable, "-m", "tca_ggml.server", "-m", model, "--port", str(port),
                            "--parallel", str(a.parallel), "-c", str(a.n_ctx), "-t", "1", "-tb", "1",
                            "--chat-format", "chatml", "--tca-density", "0.25", "--tca-window", "64",
                            "--tca-block", "16"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    res = {"check": "server-load", "clients": a.clients, "seconds": a.seconds, "parallel": a.parallel,
           "sent": {k: 0 for k, _ in MIX}, "outcomes": {}, "failures": []}
    try:
        t0 = time.time()
        while True:
            try:
                if get_json(url + "/health")["status"] == "ok":
                    break
            except OSError:
                pass
            assert srv.poll() is None and time.time() - t0 < 60, open(log_path).read()[-2000:]
            time.sleep(0.2)
        lock = threading.Lock()
        stop_at = time.time() + a.seconds
        kinds, weights = zip(*MIX)

        def client(ci: int) -> None:
            rng = random.Random(a.seed * 1000 + ci)
            while time.time() < stop_at:
                kind = rng.choices(kinds, weights)[0]
                try:
                    out = one(port, kind, rng, a.n_ctx)
                except Exception as e:  # noqa: BLE001 - every failure is reported
                    out = "failed"
                    with lock:
                        res["failures"].append(f"{kind}: {type(e).__name__}: {str(e)[:300]}")
                with lock:
                    res["sent"][kind] += 1
                    res["outcomes"][out] = res["outcomes"].get(out, 0) + 1

        t_start = time.time()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(a.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        res["wall_s"] = round(time.time() - t_start, 1)
        # idle again: every accepted request completed or was cancelled, nothing left in a slot
        deadline = time.time() + 30
        while True:
            h = get_json(url + "/health")
            if h["slots_processing"] == 0 and h["requests_queued"] == 0:
                break
            if time.time() > deadline:
                res["failures"].append(f"not idle 30 s after the last request: {h}")
                break
            time.sleep(0.2)
        m = metrics(url)
        res["metrics"] = {k: m.get(k) for k in ("requests_total", "requests_failed_total", "requests_cancelled_total",
                                                "requests_rejected_total")}
        s = res["sent"]
        want = {"requests_total": s["stream"] + s["chat"], "requests_cancelled_total": s["disconnect"],
                "requests_rejected_total": s["malformed"] + s["overlong"] + s["unknown"],
                "requests_failed_total": 0}
        # requests_total counts every request a slot ran to its end or stopped (a disconnect during
        # the generation counts there and in requests_cancelled_total); a disconnect while queued
        # counts only as cancelled; a disconnect after the last chunk was sent, as completed only
        run = s["stream"] + s["chat"] + s["disconnect"]
        tot, canc = m.get("requests_total") or 0, m.get("requests_cancelled_total") or 0
        if not (tot <= run <= tot + canc):
            res["failures"].append(f"requests_total {tot} + cancelled {canc} do not account for the {run} requests "
                                   f"that were not refused")
        if tot < s["stream"] + s["chat"] or canc > s["disconnect"]:
            res["failures"].append(f"requests_total {tot} < {s['stream'] + s['chat']} completed, or cancelled {canc} > "
                                   f"{s['disconnect']} disconnects")
        for k in ("requests_rejected_total", "requests_failed_total"):
            if (m.get(k) or 0) != want[k]:
                res["failures"].append(f"{k} = {m.get(k)}, expected {want[k]}")
        res["server_alive"] = srv.poll() is None
        if not res["server_alive"]:
            res["failures"].append(f"the server died: {open(log_path).read()[-2000:]}")
        with open(f"/proc/{srv.pid}/status") as f:
            res["server_rss_mb"] = round(int(next(x for x in f if x.startswith("VmRSS")).split()[1]) / 1024, 1)
    finally:
        srv.terminate()
        try:
            srv.wait(timeout=30)
        except subprocess.TimeoutExpired:
            srv.kill()
            res["failures"].append("the server did not stop within 30 s of SIGTERM")
        log.close()
    tb = open(log_path, errors="replace").read().count("Traceback")
    res["tracebacks_in_log"] = tb
    if tb:
        res["failures"].append(f"{tb} traceback(s) in the server log")
    res["ok"] = not res["failures"]
    print(json.dumps(res))
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
