"""Continuous batching over the sequences of one context (``Llama.sequence``; issue 16).

Views of the sequences of one context (``Llama(n_seq_max=N).sequence(i)``) are driven by their own
threads (the server's slots). Each decode step of a view is one token of its sequence; the batcher
gathers the steps that the generating views ask for at about the same time into one
``llama_decode`` -- one graph, with TCA one attention node a sequence over that sequence's rows --
and hands each view a copy of its logits row, so that a view samples when it likes without holding
the context (llama-server's continuous batching: sequences join and leave between steps). A prompt
(several tokens) is decoded chunk by chunk (a llama_decode of at most n_batch tokens each, holding
the context); between two chunks the steps that are waiting run (``let_steps_through``), so a long
prompt slows the generating sequences down but does not pause them for its whole length.

Every native use of the shared context goes through ``ctx_lock`` (one thread at a time); the
batcher's condition variable only guards its queue. A step's leader is the first thread that
finds no step running: it waits up to ``gather_s`` for the other generating views' tokens (it never
waits for a view that is not generating), decodes them all, and wakes them.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import List, Optional

import numpy as np


class _Req:
    __slots__ = ("seq", "token", "pos", "logits", "error", "done")

    def __init__(self, seq: int, token: int, pos: int):
        self.seq, self.token, self.pos = seq, token, pos
        self.logits: Optional[np.ndarray] = None
        self.error: Optional[BaseException] = None
        self.done = False


class Batcher:
    def __init__(self, llm, gather_s: float = 0.002):
        self._llm = llm                      # the context's owner (Llama): its _L, _ffi, _ctx, _scope
        self.ctx_lock = threading.RLock()    # every native use of the shared context
        self._cv = threading.Condition()
        self._pending: List[_Req] = []
        self._running = False
        self._n_active = 0                   # views inside a generation loop (they will ask again)
        self._active = {}                    # their sequences: count
        self.gather_s = gather_s
        L = llm._L
        self._batch = L.llama_batch_init(max(llm.n_seq_max, 1), 0, 1)
        self.n_steps = 0                     # llama_decode calls made for steps, and their tokens
        self.n_step_tokens = 0
        self.n_steps_done = 0                # steps finished (failed ones too); under _cv

    def close(self) -> None:
        if self._batch is not None:
            self._llm._L.llama_batch_free(self._batch)
            self._batch = None

    @contextmanager
    def generating(self, seq: int = -1):
        """A view's generation loop: the leader of a step waits (gather_s at most) for the tokens
        of every view inside one."""
        with self._cv:
            self._n_active += 1
            self._active[seq] = self._active.get(seq, 0) + 1
        try:
            yield
        finally:
            with self._cv:
                self._n_active -= 1
                self._active[seq] -= 1
                if not self._active[seq]:
                    del self._active[seq]
                self._cv.notify_all()

    def decode_one(self, seq: int, token: int, pos: int) -> np.ndarray:
        """Decode `token` at `pos` of sequence `seq` in the next step; its logits (a copy)."""
        req = _Req(seq, token, pos)
        with self._cv:
            self._pending.append(req)
            self._cv.notify_all()
            while not req.done:
                if self._running:
                    self._cv.wait()
                    continue
                self._running = True
                deadline = time.monotonic() + self.gather_s
                while len(self._pending) < self._n_active:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cv.wait(left)
                batch, self._pending = self._pending, []
                self._cv.release()
                try:
                    self._step(batch)
                finally:
                    self._cv.acquire()
                    self._running = False
                    self.n_steps_done += 1
                    self._cv.notify_all()
        if req.error is not None:
            raise req.error
        return req.logits

    def let_steps_through(self, seq: int, timeout_s: float = 5.0) -> None:
        """Called by a prompt of sequence `seq` between two of its chunks, not holding ``ctx_lock``:
        if another sequence is generating, let one decode step run first. A generating view that is
        between two steps (sampling) asks again within a moment: its request is waited for up to
        max(gather_s, 5 ms); one that is waiting or running is waited for up to timeout_s."""
        with self._cv:
            others = any(s != seq for s in self._active)
            if not (others or self._pending or self._running):
                return
            n0 = self.n_steps_done
            now = time.monotonic()
            t_ask, deadline = now + max(self.gather_s, 0.005), now + timeout_s
            while self.n_steps_done == n0:
                now = time.monotonic()
                busy = bool(self._pending or self._running)
                if now >= deadline or (not busy and now >= t_ask):
                    break
                self._cv.wait((deadline if busy else t_ask) - now)

    def _step(self, reqs: List[_Req]) -> None:
        llm = self._llm
        L, ffi = llm._L, llm._ffi
        try:
            with self.ctx_lock:
                b = self._batch
                b.n_tokens = len(reqs)
                for i, r in enumerate(reqs):
                    b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = r.token, r.pos, 1, 1
                    b.seq_id[i][0] = r.seq
                err = ffi.new("char[512]")
                rc = llm._scope.call(L.tca_decode, llm._ctx, ffi.addressof(b), err, 512)
                if rc != 0:
                    from . import _native
                    from .errors import DecodeError
                    raise DecodeError(f"llama_decode failed with code {rc} (a step of {len(reqs)} sequences): "
                                      f"{_native.err_text(err)}")
                n = llm._n_vocab
                for i, r in enumerate(reqs):
                    r.logits = np.frombuffer(ffi.buffer(L.llama_get_logits_ith(llm._ctx, i), 4 * n),
                                             np.float32).copy()
                self.n_steps += 1
                self.n_step_tokens += len(reqs)
        except BaseException as e:  # noqa: BLE001 -- each waiting view raises it
            for r in reqs:
                r.error = e
        finally:
            for r in reqs:
                r.done = True
