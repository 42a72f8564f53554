"""The server's engine: one loaded model, N slots, a FIFO queue; no web framework here.

A slot is a sequence of one context (``Llama(n_seq_max=N).sequence(i)``; with TCA each sequence
has its own budgeted retention memory), with its own prefix cache, driven by its own worker thread
(the event loop never runs native code). The slots' decode steps are batched into one
``llama_decode`` a step (``tca_ggml.batching``: continuous batching -- a request joins and leaves
between steps; a prompt is decoded alone between steps). One slot (N = 1) is a plain context.

Threads: the pool and the queue live on the event loop (no locks); a job runs in its slot's
worker thread and hands its events to the loop (``call_soon_threadsafe``); a consumer that goes
away (a client that disconnects) sets the job's cancel flag, the worker stops after the current
token, and the slot is released when the worker has returned.
"""
from __future__ import annotations

import asyncio
import collections
import math
import os
import threading
import time
import concurrent.futures
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Deque, Dict, List, Optional, Tuple

from ..llama import Llama


@dataclass
class Job:
    """One generation: the prompt's tokens (already checked to fit the context) and its settings."""
    tokens: List[int]
    max_tokens: Optional[int]
    sampling: Dict[str, Any]           # create_completion's temperature, top_p, top_k, ..., seed
    stop: List[str] = field(default_factory=list)
    echo: bool = False
    logprobs: Optional[int] = None     # the top-N of each token's log-probabilities (None: none)
    chat: bool = False                 # logprobs in OpenAI's chat shape (else the text-completion one)
    grammar: Optional[str] = None      # GBNF the text must follow (response_format, grammar)


class Slot:
    """A sequence of the shared context, the worker thread that drives it, and what it holds."""

    def __init__(self, sid: int, llm: Llama):
        self.id = sid
        self.llm = llm
        self.worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"tca-slot{sid}")
        self.cached: List[int] = []    # the tokens in its cache after its last job
        self.last_used = 0.0
        self.n_requests = 0
        self.last_tca: Optional[Dict[str, Any]] = None   # the figures of its last job

    def common_prefix(self, tokens: List[int]) -> int:
        n = 0
        for a, b in zip(self.cached, tokens):
            if a != b:
                break
            n += 1
        return n


class SlotPool:
    """Free slots and the requests waiting for one, first come first served. Event loop only.

    A request gets the free slot whose cache shares the longest prefix with its prompt (then the
    least recently used): a conversation's next turn lands where its history is cached."""

    def __init__(self, slots: List[Slot]):
        self.slots = slots
        self._free: List[Slot] = list(slots)
        self._waiters: Deque[Tuple[asyncio.Future, List[int]]] = collections.deque()

    @property
    def n_busy(self) -> int:
        return len(self.slots) - len(self._free)

    @property
    def n_waiting(self) -> int:
        return sum(1 for f, _ in self._waiters if not f.done())

    def _take(self, tokens: List[int]) -> Slot:
        best = max(self._free, key=lambda s: (s.common_prefix(tokens), -s.last_used))
        self._free.remove(best)
        return best

    async def acquire(self, tokens: List[int]) -> Slot:
        if self._free and not self.n_waiting:
            return self._take(tokens)
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((fut, tokens))
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():   # handed a slot, then cancelled: give it back
                self.release(fut.result())
            raise
        finally:
            try:
                self._waiters.remove((fut, tokens))
            except ValueError:
                pass

    def release(self, slot: Slot) -> None:
        self._free.append(slot)
        while self._free and self._waiters:
            fut, tokens = self._waiters.popleft()
            if not fut.done():
                fut.set_result(self._take(tokens))


def _finite(v: float) -> Optional[float]:
    v = float(v)
    return v if math.isfinite(v) else None


class Engine:
    """The model loaded once, one context of `parallel` sequences (the slots), a context-less
    tokenizer, and counters.

    `llama_kwargs` are Llama's; n_ctx is per slot (the context holds parallel x n_ctx; 0: the
    model's training context, per slot)."""

    def __init__(self, model_path: str, parallel: int = 1, alias: Optional[str] = None, **llama_kwargs):
        if parallel < 1:
            raise ValueError(f"parallel must be >= 1, got {parallel}")
        self.model_path = model_path
        self.alias = alias or os.path.splitext(os.path.basename(model_path))[0]
        self.created = int(time.time())
        kw = dict(llama_kwargs)
        if parallel > 1:
            n_ctx = int(kw.get("n_ctx", 512) or 0)
            if n_ctx == 0:   # the model's training context, for each slot
                from ..gguf_meta import read_kv
                md = read_kv(model_path)
                n_ctx = int(md.get(f"{md.get('general.architecture')}.context_length", 0) or 4096)
            kw.update(n_ctx=parallel * n_ctx, n_seq_max=parallel, n_batch=max(int(kw.get("n_batch", 512)), parallel))
        self.owner = Llama(model_path, **kw)
        try:
            llms = [self.owner.sequence(i) for i in range(parallel)] if parallel > 1 else [self.owner]
            self.tokenizer = self.owner.fork(vocab_only=True)
        except BaseException:
            self.owner.close()
            raise
        self.slots = [Slot(i, llm) for i, llm in enumerate(llms)]
        self.pool = SlotPool(self.slots)
        self.n_ctx = self.owner._n_ctx_seq   # what one slot (sequence) holds
        self.tca_label = self.owner.tca_label
        self.chat_format = llama_kwargs.get("chat_format")
        self._bos = self.tokenizer.tokenize(b"", add_bos=True, special=True)  # [bos] when the vocab adds one
        self._cancels: "set[threading.Event]" = set()
        self._mlock = threading.Lock()
        self.counters = collections.Counter()   # see metrics_text
        self._closed = False

    # ------------------------------------------------------------------ prompts (any thread)
    def names(self) -> List[str]:
        """The model names a request may give."""
        return [self.alias, self.model_path, os.path.basename(self.model_path)]

    def tokenize_prompt(self, prompt: str) -> List[int]:
        return self.tokenizer.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)

    def chat_tokens(self, messages: List[Dict[str, str]]) -> List[int]:
        """The prompt of a chat, as Llama.create_chat_completion builds it (the GGUF's template)."""
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        tokens = self.tokenizer.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        if self._bos and tokens[:1] != self._bos:
            tokens = self._bos + tokens
        return tokens

    # ------------------------------------------------------------------ generation (event loop)
    async def generate(self, job: Job) -> AsyncIterator[Tuple[str, Any]]:
        """Events of one job: ("slot", id) once it has a slot, ("text", (delta, finish_reason,
        logprobs of the piece's tokens or None)) per piece, then ("done", info) or ("error",
        exception). Closing the iterator early (the client went away) stops the generation after the
        current token and frees the slot."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()
        slot = await self.pool.acquire(job.tokens)
        started = False
        try:
            self._cancels.add(cancel)
            fut = loop.run_in_executor(slot.worker, self._run, slot, job, loop, queue, cancel)
            started = True

            def _done(_f, slot=slot, cancel=cancel):
                self._cancels.discard(cancel)
                self.pool.release(slot)
            fut.add_done_callback(_done)
            yield "slot", slot.id
            while True:
                kind, payload = await queue.get()
                yield kind, payload
                if kind in ("done", "error"):
                    return
        finally:
            cancel.set()   # a no-op once the job has ended
            if not started:
                self._cancels.discard(cancel)
                self.pool.release(slot)

    def _run(self, slot: Slot, job: Job, loop, queue: asyncio.Queue, cancel: threading.Event) -> None:
        """The worker: runs the job on the slot's context, hands each piece to the loop."""
        def put(kind, payload):
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (kind, payload))
            except RuntimeError:   # the loop is gone (shutdown): nobody listens
                pass

        llm = slot.llm
        slot.n_requests += 1
        slot.last_used = time.monotonic()
        try:
            if cancel.is_set():   # the client left (or the server stops) before the job started
                self._count("requests_cancelled_total")
                put("error", RuntimeError("cancelled before it started"))
                return
            gen = llm._completion(job.tokens, max_tokens=job.max_tokens, stop=job.stop or None, stream=True,
                                  echo=job.echo, logprobs=job.logprobs, grammar=job.grammar,
                                  logprobs_format="chat" if job.chat else "completion", **job.sampling)
            finish, cancelled = None, False
            try:
                for ch in gen:
                    c = ch["choices"][0]
                    finish = c["finish_reason"] or finish
                    put("text", (c["text"], c["finish_reason"], c["logprobs"]))
                    if cancel.is_set() and finish is None:
                        cancelled = True
                        break
            finally:
                gen.close()   # stops the generation (the sampler freed, the context's lock released)
            with llm._lock:
                slot.cached = list(llm._tokens)
            info = self._figures(slot, job, cancelled)
            slot.last_tca = info["tca"]
            c = self.counters
            with self._mlock:
                c["requests_total"] += 1
                c["requests_cancelled_total"] += cancelled
                c["prompt_tokens_total"] += len(job.tokens)
                c["prompt_tokens_cached_total"] += info["tca"]["timings"]["prompt_cached"]
                c["tokens_predicted_total"] += info["completion_tokens"]
                c["prompt_seconds_total"] += info["tca"]["timings"]["prefill_s"]
                c["tokens_predicted_seconds_total"] += info["tca"]["timings"]["decode_s"]
            put("done", info)
        except BaseException as e:  # noqa: BLE001 -- handed to the request, never lost in the thread
            self._count("requests_failed_total")
            with llm._lock:
                slot.cached = list(llm._tokens)
            put("error", e)

    def _figures(self, slot: Slot, job: Job, cancelled: bool) -> Dict[str, Any]:
        """Usage and the TCA figures of the job just run (its slot's context, after it)."""
        llm = slot.llm
        n_gen = getattr(llm, "_last_n_generated", 0)
        st = llm.tca_stats()
        mem = llm.memory_bytes()
        t = llm.timings
        n_heads = len(st["layer"])
        tca: Dict[str, Any] = {"active": st["active"], "label": st["label"], "slot": slot.id,
                               "kv_bytes": mem["kv"], "compute_bytes": mem["compute"]}
        if st["active"]:
            cov = [c for c in (float(x) for x in st["coverage"]) if math.isfinite(c)]
            seen = st["n_seen"]
            tca.update({
                # the share of the sequence's rows that decode attends (the fast tier), over all heads
                "kept_share": _finite(st["rows_kept"] / (seen * n_heads)) if seen and n_heads else None,
                "coverage_mean": sum(cov) / len(cov) if cov else None,
                "coverage_min": min(cov) if cov else None,
                "n_seen": seen, "rows_kept": st["rows_kept"], "rows_held": st["rows_held"],
                "kv_bytes_dense": st["bytes_dense"], "kv_bytes_resident": st["bytes_resident"],
                "kv_bytes_hold": st["bytes_hold"], "n_compactions": st["n_compactions"],
                "retention": st["retention"], "prefill": st["prefill"]})
        else:
            tca.update({"kept_share": 1.0, "coverage_mean": None, "coverage_min": None,
                        "kv_bytes_dense": mem["kv"]})
        tca["timings"] = {"prompt_tokens": len(job.tokens), "prompt_cached": t.prompt_cached,
                          "prompt_evaluated": t.prompt_tokens, "prefill_s": round(t.prefill_s, 6),
                          "decode_tokens": t.decode_tokens, "decode_s": round(t.decode_s, 6),
                          "decode_tps": round(t.decode_tps, 3)}
        return {"completion_tokens": n_gen, "prompt_tokens": len(job.tokens), "cancelled": cancelled, "tca": tca}

    # ------------------------------------------------------------------ state, metrics
    def _count(self, name: str, n: float = 1) -> None:
        with self._mlock:
            self.counters[name] += n

    def health(self) -> Dict[str, Any]:
        return {"status": "ok", "slots_idle": len(self.slots) - self.pool.n_busy,
                "slots_processing": self.pool.n_busy, "requests_queued": self.pool.n_waiting}

    def metrics_text(self) -> str:
        """Prometheus text exposition (version 0.0.4), llama-server's metric names under tca_ggml_."""
        with self._mlock:
            c = dict(self.counters)
        out = []

        def metric(name, kind, help_, samples):
            out.append(f"# HELP tca_ggml_{name} {help_}")
            out.append(f"# TYPE tca_ggml_{name} {kind}")
            for labels, v in samples:
                lab = "{" + ",".join(f'{k}="{v2}"' for k, v2 in labels.items()) + "}" if labels else ""
                out.append(f"tca_ggml_{name}{lab} {float(v):g}" if isinstance(v, float) else f"tca_ggml_{name}{lab} {v}")

        for name, help_ in (("requests_total", "Requests completed."),
                            ("requests_failed_total", "Requests that failed in generation."),
                            ("requests_cancelled_total", "Requests stopped because the client went away."),
                            ("requests_rejected_total", "Requests refused with a 4xx error."),
                            ("prompt_tokens_total", "Prompt tokens of completed requests."),
                            ("prompt_tokens_cached_total", "Of those, tokens reused from a slot's cache."),
                            ("tokens_predicted_total", "Generated tokens."),
                            ("prompt_seconds_total", "Prompt processing time."),
                            ("tokens_predicted_seconds_total", "Generation time.")):
            v = c.get(name, 0)
            metric(name, "counter", help_, [({}, float(v) if "seconds" in name else int(v))])
        metric("slots", "gauge", "Parallel slots (sequences of the one context).", [({}, len(self.slots))])
        b = self.owner._batcher
        metric("batched_steps_total", "counter", "Decode steps (one llama_decode each) of the slots' sequences.",
               [({}, b.n_steps if b else 0)])
        metric("batched_step_tokens_total", "counter", "Tokens decoded in those steps (tokens/steps: the batch size).",
               [({}, b.n_step_tokens if b else 0)])
        metric("requests_processing", "gauge", "Requests holding a slot.", [({}, self.pool.n_busy)])
        metric("requests_deferred", "gauge", "Requests waiting for a slot.", [({}, self.pool.n_waiting)])
        last = [(s, s.last_tca) for s in self.slots if s.last_tca is not None]
        metric("slot_kv_bytes", "gauge", "KV memory of each slot's context after its last request.",
               [({"slot": s.id}, t["kv_bytes"]) for s, t in last])
        metric("slot_kept_share", "gauge", "Share of the sequence's rows decode attends (TCA), last request.",
               [({"slot": s.id}, float(t["kept_share"])) for s, t in last if t.get("kept_share") is not None])
        metric("slot_requests_total", "counter", "Requests run on each slot.",
               [({"slot": s.id}, s.n_requests) for s in self.slots])
        return "\n".join(out) + "\n"

    def close(self) -> None:
        """Stop running jobs (after their current token), wait for the workers, free the contexts
        and the model."""
        if self._closed:
            return
        self._closed = True
        for ev in list(self._cancels):
            ev.set()
        for s in self.slots:
            s.worker.shutdown(wait=True)
        self.owner.close()   # its sequence views too
        self.tokenizer.close()
