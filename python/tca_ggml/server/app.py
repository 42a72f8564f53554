"""The OpenAI-compatible HTTP API (FastAPI, SSE for streams) over an ``Engine``.

    GET  /health                 {"status": "ok", slots idle / processing, requests queued}
    GET  /metrics                Prometheus text
    GET  /v1/models              the served model
    POST /v1/completions         prompt -> text (stream: SSE chunks, then [DONE])
    POST /v1/chat/completions    messages -> the GGUF's chat template -> text

Every completion (the last chunk of a stream) carries ``"tca": {...}``: the request's TCA
figures from its slot's context (kept share, coverage, KV bytes, timings; docs/serving.md).
Errors are OpenAI's ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status for a
bad request (malformed JSON, bad parameters, unknown model, a prompt over the context).
Parameters the API defines but this server does not implement (n > 1, logit_bias, suffix,
tools, logprobs with echo) are a 400 naming the parameter; parameters it does not know are
ignored (as llama-server does); llama.cpp's top_k, min_p, typical_p and repeat_penalty, and
llama-cpp-python's ``grammar`` (GBNF text), are accepted as extensions. ``logprobs`` (completions:
the top-N, N <= 20; chat: logprobs / top_logprobs <= 20) and ``response_format`` (json_object,
json_schema: llama.cpp's grammar sampler, tca_ggml.grammar) follow OpenAI's shapes.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from typing import Any, Dict, List, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..grammar import GrammarError, UnsupportedSchemaError, response_format_grammar
from .engine import Engine, Job

MAX_LOGPROBS = 20   # OpenAI's bound of top_logprobs (and here of a completion's logprobs)


class APIError(Exception):
    """An OpenAI-style error response."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type_: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


# ------------------------------------------------------------------ request parsing
def _bad(param: str, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def _number(body: Dict[str, Any], name: str, default, lo=None, hi=None, integer=False):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        raise _bad(name, f"'{name}' must be {'an integer' if integer else 'a number'}, got {json.dumps(v)}",
                   "invalid_type")
    if isinstance(v, float) and v != v:
        raise _bad(name, f"'{name}' must be a number, got NaN")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise _bad(name, f"'{name}' must be in [{lo}, {hi}], got {v}")
    return v


def _unsupported(body: Dict[str, Any], name: str, ok=lambda v: v is None) -> None:
    if name in body and not ok(body[name]):
        raise _bad(name, f"'{name}'={json.dumps(body[name])} is not supported by this server", "unsupported_parameter")


def _sampling(body: Dict[str, Any], temperature: float) -> Dict[str, Any]:
    """create_completion's sampling arguments from a request (OpenAI's names and ranges, and
    llama.cpp's extensions)."""
    seed = _number(body, "seed", None, integer=True)
    return {
        "temperature": float(_number(body, "temperature", temperature, 0, 2)),
        "top_p": float(_number(body, "top_p", 0.95, 0, 1)),
        "top_k": int(_number(body, "top_k", 40, 0, 1 << 30, integer=True)),
        "min_p": float(_number(body, "min_p", 0.05, 0, 1)),
        "typical_p": float(_number(body, "typical_p", 1.0, 0, 1)),
        "repeat_penalty": float(_number(body, "repeat_penalty", 1.0, 1e-6, 100)),
        "frequency_penalty": float(_number(body, "frequency_penalty", 0.0, -2, 2)),
        "presence_penalty": float(_number(body, "presence_penalty", 0.0, -2, 2)),
        "seed": None if seed is None else seed % (1 << 32),
    }


def _stop(body: Dict[str, Any]) -> List[str]:
    s = body.get("stop")
    if s is None:
        return []
    if isinstance(s, str):
        return [s] if s else []
    if isinstance(s, list) and all(isinstance(x, str) for x in s):
        return [x for x in s if x]
    raise _bad("stop", "'stop' must be a string or a list of strings", "invalid_type")


def _common_unsupported(body: Dict[str, Any]) -> None:
    _unsupported(body, "n", lambda v: v is None or v == 1)
    _unsupported(body, "best_of", lambda v: v is None or v == 1)
    _unsupported(body, "logit_bias", lambda v: not v)


def _completion_logprobs(body: Dict[str, Any]) -> Optional[int]:
    """/v1/completions' logprobs: the number of most likely tokens reported with each token."""
    v = body.get("logprobs")
    if v is None or v is False:
        return None
    n = _number(body, "logprobs", None, 0, MAX_LOGPROBS, integer=True)
    if body.get("echo"):
        raise _bad("logprobs", "'logprobs' with 'echo' is not supported by this server (the prompt's tokens "
                               "have no log-probabilities here)", "unsupported_parameter")
    return n


def _chat_logprobs(body: Dict[str, Any]) -> Optional[int]:
    """/v1/chat/completions' logprobs (a boolean) and top_logprobs: the N of each token's top list,
    or None when logprobs is off."""
    lp = body.get("logprobs")
    if lp is not None and not isinstance(lp, bool):
        raise _bad("logprobs", "'logprobs' must be a boolean", "invalid_type")
    n = _number(body, "top_logprobs", None, 0, MAX_LOGPROBS, integer=True)
    if n is not None and not lp:
        raise _bad("top_logprobs", "'top_logprobs' needs 'logprobs': true")
    return (n or 0) if lp else None


def _grammar_of(body: Dict[str, Any], chat: bool) -> Optional[str]:
    """The GBNF of a request: its response_format (chat) or its grammar (llama-cpp-python's
    extension), or None. Schema errors are 400s naming the parameter."""
    g = body.get("grammar")
    if g is not None and not isinstance(g, str):
        raise _bad("grammar", "'grammar' must be a string (GBNF)", "invalid_type")
    if chat and body.get("response_format") is not None:
        try:
            fmt = response_format_grammar(body["response_format"])
        except UnsupportedSchemaError as e:
            raise _bad("response_format", str(e), "unsupported_parameter")
        except GrammarError as e:
            raise _bad("response_format", str(e))
        if fmt is not None:
            if g is not None:
                raise _bad("grammar", "give 'response_format' or 'grammar', not both")
            return fmt
    return g or None


def _max_tokens(body: Dict[str, Any], default: Optional[int], *names: str) -> Optional[int]:
    for name in names:
        v = _number(body, name, None, 1, 1 << 30, integer=True)
        if v is not None:
            return v
    return default


def _messages(body: Dict[str, Any]) -> List[Dict[str, str]]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("messages", "'messages' must be a non-empty list of {role, content} objects",
                   "invalid_type" if "messages" in body else "missing_required_parameter")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _bad(f"messages[{i}]", f"messages[{i}] must be an object with a string 'role'", "invalid_type")
        c = m.get("content")
        if c is None:
            c = ""
        elif isinstance(c, list):   # content parts: text only
            parts = []
            for p in c:
                if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                    raise _bad(f"messages[{i}].content", "only text content parts are supported",
                               "unsupported_parameter")
                parts.append(p["text"])
            c = "".join(parts)
        elif not isinstance(c, str):
            raise _bad(f"messages[{i}].content", f"messages[{i}].content must be a string or a list of text parts",
                       "invalid_type")
        out.append({"role": m["role"], "content": c})
    return out


# ------------------------------------------------------------------ the application
def create_app(engine: Engine, api_key: Optional[str] = None) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        # shutdown (SIGINT / SIGTERM): stop the jobs after their current token, free the contexts
        # and the model (uvicorn re-raises the signal afterwards, so nothing after it would run)
        await asyncio.to_thread(engine.close)

    app = FastAPI(title="tca_ggml", description="OpenAI-compatible API over tca_ggml.Llama (TCA sparse attention)",
                  version="0.1.0", lifespan=lifespan)
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        if e.status < 500:
            engine._count("requests_rejected_total")
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return APIError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None).response()

    def _auth(request: Request) -> None:
        if api_key is not None and request.headers.get("authorization", "") != f"Bearer {api_key}":
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")

    async def _body(request: Request) -> Dict[str, Any]:
        _auth(request)
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"We could not parse the JSON body of your request: {e}", code="invalid_json")
        if not isinstance(body, dict):
            raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
        model = body.get("model")
        if model is not None and model not in engine.names():
            raise APIError(404, f"The model '{model}' does not exist (this server serves '{engine.alias}').",
                           param="model", code="model_not_found")
        if "stream" in body and not isinstance(body["stream"], bool) and body["stream"] is not None:
            raise _bad("stream", "'stream' must be a boolean", "invalid_type")
        so = body.get("stream_options")
        if so is not None and not isinstance(so, dict):
            raise _bad("stream_options", "'stream_options' must be an object", "invalid_type")
        return body

    async def _check_grammar(grammar: Optional[str], param: str) -> None:
        """llama.cpp's parser over the grammar (the tokenizer's vocabulary), before a slot is taken."""
        if grammar is None:
            return
        try:
            await asyncio.to_thread(engine.tokenizer.check_grammar, grammar)
        except GrammarError as e:
            raise _bad(param, str(e))

    def _check_fits(tokens: List[int], param: str) -> None:
        if not tokens:
            raise _bad(param, "the prompt is empty")
        if len(tokens) >= engine.n_ctx:
            raise APIError(400, f"This model's maximum context length is {engine.n_ctx} tokens, however you "
                                f"requested {len(tokens)} tokens in the prompt (a completion needs at least one "
                                f"more). Please reduce the length of the prompt.",
                           param=param, code="context_length_exceeded")

    @app.get("/health")
    async def health():
        return engine.health()

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(engine.metrics_text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models(request: Request):
        _auth(request)
        return {"object": "list", "data": [{
            "id": engine.alias, "object": "model", "created": engine.created, "owned_by": "tca_ggml",
            "meta": {"path": engine.model_path, "n_ctx": engine.n_ctx, "parallel": len(engine.slots),
                     "attention": engine.tca_label}}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _body(request)
        _common_unsupported(body)
        _unsupported(body, "suffix", lambda v: not v)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]   # a batch of one
        if isinstance(prompt, str):
            tokens = await asyncio.to_thread(engine.tokenize_prompt, prompt)
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            n_vocab = engine.tokenizer.n_vocab()
            bad = [t for t in prompt if not 0 <= t < n_vocab]
            if bad:
                raise _bad("prompt", f"token id {bad[0]} out of range [0, {n_vocab})")
            tokens = list(prompt)
        elif isinstance(prompt, list) and len(prompt) > 1:
            raise _bad("prompt", "a batch of several prompts is not supported: send one per request",
                       "unsupported_parameter")
        else:
            raise _bad("prompt", "'prompt' must be a string or a list of token ids",
                       "invalid_type" if "prompt" in body else "missing_required_parameter")
        _check_fits(tokens, "prompt")
        echo = body.get("echo", False)
        if not isinstance(echo, bool):
            raise _bad("echo", "'echo' must be a boolean", "invalid_type")
        logprobs = _completion_logprobs(body)
        grammar = _grammar_of(body, chat=False)
        job = Job(tokens=tokens, max_tokens=_max_tokens(body, 16, "max_tokens"), sampling=_sampling(body, 0.8),
                  stop=_stop(body), echo=echo, logprobs=logprobs, grammar=grammar)
        await _check_grammar(grammar, "grammar")
        return await _respond(request, body, job, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _body(request)
        _common_unsupported(body)
        _unsupported(body, "tools", lambda v: not v)
        _unsupported(body, "functions", lambda v: not v)
        logprobs = _chat_logprobs(body)
        grammar = _grammar_of(body, chat=True)
        messages = _messages(body)
        try:
            tokens = await asyncio.to_thread(engine.chat_tokens, messages)
        except ValueError as e:   # no chat template, or one llama.cpp does not know
            raise _bad("messages", str(e), "chat_template_error")
        _check_fits(tokens, "messages")
        job = Job(tokens=tokens, max_tokens=_max_tokens(body, None, "max_completion_tokens", "max_tokens"),
                  sampling=_sampling(body, 0.2), stop=_stop(body), logprobs=logprobs, chat=True, grammar=grammar)
        await _check_grammar(grammar, "grammar" if body.get("grammar") is not None else "response_format")
        return await _respond(request, body, job, chat=True)

    async def _respond(request: Request, body: Dict[str, Any], job: Job, chat: bool):
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4()}"
        created = int(time.time())
        model = body.get("model") or engine.alias
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        obj = "chat.completion" if chat else "text_completion"

        def usage(info):
            return {"prompt_tokens": info["prompt_tokens"], "completion_tokens": info["completion_tokens"],
                    "total_tokens": info["prompt_tokens"] + info["completion_tokens"]}

        def merged(parts):
            """The logprobs of several pieces as one (None when the request asked for none)."""
            if job.logprobs is None:
                return None
            parts = [p for p in parts if p]
            if chat:
                return {"content": [e for p in parts for e in p["content"]], "refusal": None}
            return {k: [x for p in parts for x in p[k]] for k in ("tokens", "text_offset", "token_logprobs",
                                                                 "top_logprobs")}

        if body.get("stream"):
            def chunk(text, finish, first=False, lp=None):
                lp = merged([lp])
                if chat:
                    delta = ({"role": "assistant", "content": text} if first else
                             ({"content": text} if text or finish is None else {}))
                    choice = {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}
                    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                            "choices": [choice]}
                return {"id": rid, "object": "text_completion", "created": created, "model": model,
                        "choices": [{"text": text, "index": 0, "logprobs": lp, "finish_reason": finish}]}

            async def events():
                first, last = True, None
                async for kind, p in engine.generate(job):
                    if kind == "text":
                        text, finish, lp = p
                        if finish is not None:   # held until "done": the last chunk carries the figures
                            last = chunk(text, finish, first, lp)
                            continue
                        if not text and not first and not lp:
                            continue
                        yield json.dumps(chunk(text, None, first, lp))
                        first = False
                    elif kind == "done":
                        last = last or chunk("", "length", first)
                        last["tca"] = p["tca"]
                        yield json.dumps(last)
                        if include_usage:
                            yield json.dumps({"id": rid, "object": last["object"], "created": created,
                                              "model": model, "choices": [], "usage": usage(p)})
                    elif kind == "error":
                        yield json.dumps({"error": {"message": f"generation failed: {p}", "type": "server_error",
                                                    "param": None, "code": None}})
                        break
                yield "[DONE]"
            return EventSourceResponse(events(), ping=15)

        # not streamed: collected here, stopped if the client goes away meanwhile
        async def collect():
            text, finish, lps = [], None, []
            async for kind, p in engine.generate(job):
                if kind == "text":
                    text.append(p[0])
                    finish = p[1] or finish
                    lps.append(p[2])
                elif kind == "done":
                    return "".join(text), finish or "length", merged(lps), p
                elif kind == "error":
                    raise p
            raise RuntimeError("the generation ended without a result")

        async def disconnected():
            while True:
                msg = await request.receive()
                if msg["type"] == "http.disconnect":
                    return

        task, watch = asyncio.ensure_future(collect()), asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():
                task.cancel()
            watch.cancel()
        if not task.done() or task.cancelled():
            try:
                await task
            except BaseException:  # noqa: BLE001
                pass
            raise APIError(499, "client closed the request", code="client_closed")
        try:
            text, finish, lp, info = task.result()
        except APIError:
            raise
        except Exception as e:  # noqa: BLE001
            raise APIError(500, f"generation failed: {type(e).__name__}: {e}")
        if chat:
            out = {"id": rid, "object": obj, "created": created, "model": model,
                   "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                                "finish_reason": finish}]}
        else:
            out = {"id": rid, "object": obj, "created": created, "model": model,
                   "choices": [{"text": text, "index": 0, "logprobs": lp, "finish_reason": finish}]}
        out["usage"] = usage(info)
        out["tca"] = info["tca"]
        return out

    return app
