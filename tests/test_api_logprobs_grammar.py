"""logprobs and constrained generation (grammar, response_format) in Llama and the server (issue 16).

Over the tiny random-weight GGUF (tca_ggml.random_model "tiny": a byte-level vocabulary, token id
b = byte b for the 256 bytes, 510 BOS, 511 EOS; text is gibberish, greedy tokens are exact):

- logprobs are checked against a reference: the numpy log-softmax of the logits an independent
  Llama computes for the same prefix from an empty cache (``eval_logits``);
- grammars are checked as languages: the grammar sampler alone, fed a text byte by byte (each
  byte must be a token the sampler leaves finite, and the end of text must be allowed at the end),
  says whether the text is a sentence of the grammar -- JSON documents a schema accepts and ones it
  refuses; then generation under a grammar must give text that json.loads parses and that matches
  the schema.
The server part starts a real server (tests/test_server.py's ``start_server``: 4 slots, TCA at a
forced density) and drives it with the ``openai`` client.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from _helpers import tiny_gguf

N_CTX = 512
BOOL_SCHEMA = {"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"]}
PROMPT = "7 " + " ".join(f"w{(k * 13) % 31}" for k in range(12))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_gguf(tmp_path_factory, "lpg", seed=5)


@pytest.fixture(scope="module")
def llm(tiny):
    from tca_ggml import Llama
    m = Llama(tiny, n_ctx=N_CTX, n_threads=1, n_threads_batch=1, verbose=False, chat_format="chatml")
    yield m
    m.close()


@pytest.fixture(scope="module")
def ref(tiny):
    """An independent Llama over the same model: the reference forward passes."""
    from tca_ggml import Llama
    m = Llama(tiny, n_ctx=N_CTX, n_threads=1, n_threads_batch=1, verbose=False, chat_format="chatml")
    yield m
    m.close()


def log_softmax(logits) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    m = x.max()
    return x - (m + np.log(np.exp(x - m).sum()))


def expected_top(llm, want, tok, n):
    """llama-cpp-python's top_logprobs dict from reference log-probabilities: the n most likely
    tokens' texts (UTF-8, undecodable bytes dropped: two tokens may share a key, the likelier one
    kept), plus the sampled token's."""
    top = {}
    for i in sorted(range(len(want)), key=lambda i: (-want[i], i))[:n]:
        top.setdefault(llm.detokenize([i]).decode("utf-8", "ignore"), want[i])
    top[llm.detokenize([tok]).decode("utf-8", "ignore")] = want[tok]
    return top


def chat_tokens(llm, msgs):
    """The prompt create_chat_completion builds (the chat template, BOS when the vocabulary adds it)."""
    toks = llm.tokenize(llm.apply_chat_template(msgs).encode(), add_bos=False, special=True)
    return [llm.token_bos()] + toks if llm._L.llama_vocab_get_add_bos(llm._vocab) else toks


def reference_logprobs(ref, prompt_tokens, generated):
    """The log-softmax of the logits of each generated token's prefix, from an empty cache each time."""
    return [log_softmax(ref.eval_logits(list(prompt_tokens) + list(generated[:i]))) for i in range(len(generated))]


# ------------------------------------------------------------------ logprobs: Llama
def test_completion_logprobs_equal_a_reference_forward(llm, ref):
    toks = llm.tokenize(PROMPT.encode())
    gen = list(llm.generate_tokens(toks, 8, temperature=0))
    r = llm.create_completion(PROMPT, max_tokens=8, temperature=0, logprobs=5)
    c = r["choices"][0]
    lp = c["logprobs"]
    assert set(lp) == {"tokens", "text_offset", "token_logprobs", "top_logprobs"}
    assert len(lp["tokens"]) == len(gen) == r["usage"]["completion_tokens"] == 8
    # each token's text (undecodable bytes dropped, as llama-cpp-python), where it starts in prompt +
    # completion (the text has U+FFFD for a lone byte of a random model's)
    pieces = [ref.detokenize([t]) for t in gen]
    assert lp["tokens"] == [p.decode("utf-8", "ignore") for p in pieces]
    assert b"".join(pieces).decode("utf-8", "replace") == c["text"]
    offs = lp["text_offset"]
    assert offs[0] == len(PROMPT) and offs == sorted(offs) and offs[-1] < len(PROMPT) + len(c["text"])
    assert all(c["text"][o - len(PROMPT):].startswith(s) for o, s in zip(offs, lp["tokens"]))
    refs = reference_logprobs(ref, toks, gen)
    for i, (t, want) in enumerate(zip(gen, refs)):
        assert lp["token_logprobs"][i] == pytest.approx(want[t], abs=2e-4)
        assert int(np.argmax(want)) == t                      # greedy: the most likely token
        top = lp["top_logprobs"][i]
        vals = list(top.values())
        assert vals == sorted(vals, reverse=True) and lp["tokens"][i] in top
        assert max(vals) == pytest.approx(lp["token_logprobs"][i])  # greedy: the sampled one is the top one
        exp = expected_top(ref, want, t, 5)
        assert list(top) == list(exp) and vals == pytest.approx(list(exp.values()), abs=2e-4)


def test_chat_logprobs_openai_shape_and_reference(llm, ref):
    msgs = [{"role": "user", "content": PROMPT}]
    r = llm.create_chat_completion(msgs, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    c = r["choices"][0]
    content = c["logprobs"]["content"]
    assert c["logprobs"]["refusal"] is None and len(content) == r["usage"]["completion_tokens"] == 6
    assert b"".join(bytes(e["bytes"]) for e in content).decode("utf-8", "replace") == c["message"]["content"]
    prompt = chat_tokens(llm, msgs)
    gen = list(llm.generate_tokens(prompt, 6, temperature=0))
    assert [llm.detokenize([t]) for t in gen] == [bytes(e["bytes"]) for e in content]
    for e, want, t in zip(content, reference_logprobs(ref, prompt, gen), gen):
        assert set(e) == {"token", "logprob", "bytes", "top_logprobs"}
        assert e["logprob"] == pytest.approx(want[t], abs=2e-4)
        top = e["top_logprobs"]
        assert len(top) == 3 and [x["logprob"] for x in top] == sorted((x["logprob"] for x in top), reverse=True)
        assert top[0]["logprob"] == pytest.approx(e["logprob"]) and top[0]["bytes"] == e["bytes"]
        ids = sorted(range(len(want)), key=lambda i: (-want[i], i))[:3]
        assert [x["bytes"] for x in top] == [list(ref.detokenize([i])) for i in ids]
        assert [x["logprob"] for x in top] == pytest.approx([want[i] for i in ids], abs=2e-4)
    # logprobs=True alone: each token's own log-probability, an empty top list
    r0 = llm.create_chat_completion(msgs, max_tokens=3, temperature=0, logprobs=True)
    assert [e["top_logprobs"] for e in r0["choices"][0]["logprobs"]["content"]] == [[], [], []]
    assert llm.create_chat_completion(msgs, max_tokens=2, temperature=0)["choices"][0]["logprobs"] is None


def test_streamed_logprobs_are_the_chunks_tokens(llm):
    """Each chunk carries the logprobs of its own tokens; together they are the non-streamed ones
    (greedy), for both shapes; a stop string drops the tokens after it with their text."""
    whole = llm.create_completion(PROMPT, max_tokens=10, temperature=0, logprobs=2)["choices"][0]
    chunks = list(llm.create_completion(PROMPT, max_tokens=10, temperature=0, logprobs=2, stream=True))
    got = {k: [x for ch in chunks for x in ch["choices"][0]["logprobs"][k]] for k in whole["logprobs"]}
    # (the same prompt again reuses its cached prefix: the logits may differ in the last bits)
    assert got["tokens"] == whole["logprobs"]["tokens"] and got["text_offset"] == whole["logprobs"]["text_offset"]
    assert got["token_logprobs"] == pytest.approx(whole["logprobs"]["token_logprobs"], abs=1e-4)
    assert [list(t) for t in got["top_logprobs"]] == [list(t) for t in whole["logprobs"]["top_logprobs"]]
    at = len(PROMPT)
    for ch in chunks:   # a chunk's tokens start in its text
        c = ch["choices"][0]
        assert all(at <= o < at + len(c["text"]) for o in c["logprobs"]["text_offset"]), (at, c)
        at += len(c["text"])
    msgs = [{"role": "user", "content": PROMPT}]
    chat = llm.create_chat_completion(msgs, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2)
    parts = list(llm.create_chat_completion(msgs, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2,
                                            stream=True))
    streamed = [e for p in parts for e in p["choices"][0]["logprobs"]["content"]]
    content = chat["choices"][0]["logprobs"]["content"]
    assert [(e["token"], e["bytes"], [t["bytes"] for t in e["top_logprobs"]]) for e in streamed] == \
        [(e["token"], e["bytes"], [t["bytes"] for t in e["top_logprobs"]]) for e in content]
    assert [e["logprob"] for e in streamed] == pytest.approx([e["logprob"] for e in content], abs=1e-4)
    # a stop string: the text stops before it, so do the tokens
    text = whole["text"]
    stop = text[5:7]
    cut = llm.create_completion(PROMPT, max_tokens=10, temperature=0, logprobs=2, stop=[stop])["choices"][0]
    assert cut["finish_reason"] == "stop" and cut["text"] == text[:text.index(stop)]
    n = len(cut["logprobs"]["tokens"])
    starts = [o - len(PROMPT) for o in whole["logprobs"]["text_offset"]]   # in the completion
    assert cut["logprobs"]["tokens"] == whole["logprobs"]["tokens"][:n]
    assert starts[n - 1] < len(cut["text"]) and (n == len(starts) or starts[n] >= len(cut["text"]))


def test_sequence_views_logprobs_equal_a_plain_context(tiny, llm):
    """A view of one sequence of a shared context samples from its own copy of its logits row:
    the same logprobs as a plain context."""
    from tca_ggml import Llama
    want = llm.create_completion(PROMPT, max_tokens=5, temperature=0, logprobs=3)["choices"][0]["logprobs"]
    owner = Llama(tiny, n_ctx=2 * N_CTX, n_seq_max=2, n_threads=1, n_threads_batch=1, verbose=False)
    try:
        got = owner.sequence(1).create_completion(PROMPT, max_tokens=5, temperature=0, logprobs=3)["choices"][0]
        assert got["logprobs"]["tokens"] == want["tokens"]
        assert got["logprobs"]["token_logprobs"] == pytest.approx(want["token_logprobs"], abs=2e-4)
    finally:
        owner.close()


def test_logprobs_parameter_errors(llm):
    with pytest.raises(ValueError, match="logprobs"):
        llm.create_completion("hi", max_tokens=2, logprobs=-1)
    with pytest.raises(TypeError, match="logprobs"):
        llm.create_completion("hi", max_tokens=2, logprobs="3")
    with pytest.raises(ValueError, match="echo"):
        llm.create_completion("hi", max_tokens=2, logprobs=1, echo=True)
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(ValueError, match="top_logprobs"):
        llm.create_chat_completion(msgs, max_tokens=2, top_logprobs=2)
    with pytest.raises(TypeError, match="logprobs"):
        llm.create_chat_completion(msgs, max_tokens=2, logprobs=2)


# ------------------------------------------------------------------ grammars as languages
def accepts(llm, gbnf: str, text: str) -> bool:
    """Whether `text` is a sentence of the grammar: the grammar sampler alone, fed the text one byte
    token at a time (tiny vocabulary: token id = byte), never excludes the next byte, and allows the
    end of text at the end. Nothing is accepted that the sampler excluded (llama.cpp would throw)."""
    L, ffi = llm._L, llm._ffi
    n = llm.n_vocab()
    smpl = llm._grammar_sampler(gbnf)
    try:
        def allowed():
            cur = np.zeros(n, dtype=[("id", np.int32), ("logit", np.float32), ("p", np.float32)])
            cur["id"] = np.arange(n)
            arr = ffi.new("llama_token_data_array *")
            arr.data = ffi.cast("llama_token_data *", cur.ctypes.data)
            arr.size, arr.selected, arr.sorted = n, -1, False
            L.llama_sampler_apply(smpl, arr)
            return np.isfinite(cur["logit"][np.argsort(cur["id"])])
        for b in text.encode("utf-8"):
            if not allowed()[b]:
                return False
            L.llama_sampler_accept(smpl, b)
        return bool(allowed()[llm.token_eos()])
    finally:
        L.llama_sampler_free(smpl)


def test_json_grammars_accept_json_and_refuse_the_rest(llm):
    from tca_ggml.grammar import JSON_GBNF, JSON_OBJECT_GBNF
    good = ['{}', '{"a": 1, "b": [true, false, null], "c": {"d": "e\\n\\u00e9"}}', '[1, -2.5e3, "x"]',
            '"s"', '0', '-0.25', 'null', '{\n  "k": [ ]\n}', '{"é": "ü"}']
    bad = ['{', '{"a"}', '{"a": }', '[1,]', '01', '"unterminated', 'True', "{'a': 1}", '{"a": 1}}', '1.',
           '"\x01"', '{} x']
    for t in good:
        assert accepts(llm, JSON_GBNF, t), t
        assert json.loads(t) is not None or t == "null"
    for t in bad:
        assert not accepts(llm, JSON_GBNF, t), t
    assert accepts(llm, JSON_OBJECT_GBNF, '{"a": [1]}')
    for t in ('[1]', '"s"', '1', 'null'):
        assert accepts(llm, JSON_GBNF, t) and not accepts(llm, JSON_OBJECT_GBNF, t), t


SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 4},
        "n": {"type": "integer"},
        "x": {"type": "number"},
        "tags": {"type": "array", "items": {"enum": ["red", "blue"]}, "minItems": 1, "maxItems": 2},
        "kind": {"const": "k"},
        "opt": {"type": ["string", "null"], "maxLength": 3},
        "sub": {"$ref": "#/$defs/Sub"},
    },
    "required": ["name", "n", "tags", "kind", "sub"],
    "$defs": {"Sub": {"type": "object", "properties": {"b": {"type": "boolean"}, "s": {"$ref": "#/$defs/Sub"}},
                      "required": ["b"], "title": "Sub"}},
}


def in_schema_order(d):
    order = list(SCHEMA["properties"])
    return {k: d[k] for k in sorted(d, key=lambda k: order.index(k) if k in order else len(order))}


def test_schema_grammar_is_the_schema(llm):
    """The grammar generates the schema's properties in the schema's order (a subset of the valid
    documents, enough to generate): valid documents in that order are sentences, invalid ones not."""
    from tca_ggml.grammar import json_schema_to_gbnf
    g = json_schema_to_gbnf(SCHEMA)
    base = {"name": "ab", "n": -12, "tags": ["red"], "kind": "k", "sub": {"b": True}}
    good = [base, {**base, "x": 1.5e2, "opt": None}, {**base, "opt": "z\u00e9", "tags": ["blue", "red"]},
            {**base, "sub": {"b": False, "s": {"b": True, "s": {"b": False}}}}, {**base, "name": ""},
            {**base, "x": -0.5, "n": 0}]
    bad = [{k: v for k, v in base.items() if k != "n"},              # a required property missing
           {**base, "n": 1.5}, {**base, "name": "abcde"}, {**base, "tags": []}, {**base, "tags": ["red"] * 3},
           {**base, "tags": ["green"]}, {**base, "kind": "j"}, {**base, "opt": 3}, {**base, "opt": "abcd"},
           {**base, "sub": {}}, {**base, "sub": {"b": True, "s": {}}}, {**base, "extra": 1}, {**base, "x": "1"}]
    good, bad = [in_schema_order(d) for d in good], [in_schema_order(d) for d in bad]
    for d in good:
        for text in (json.dumps(d), json.dumps(d, indent=2), json.dumps(d, separators=(",", ":"))):
            assert accepts(llm, g, text), text
    for d in bad:
        assert not accepts(llm, g, json.dumps(d)), d
    # the schema's property order; optional ones anywhere they may be left out
    assert not accepts(llm, g, json.dumps({"n": 1, **base}))
    assert accepts(llm, json_schema_to_gbnf({"type": "object", "properties": {"a": {}, "b": {}}}), '{}')


def test_unsupported_schemas_name_the_keyword(llm):
    from tca_ggml.grammar import GrammarError, json_schema_to_gbnf, response_format_grammar
    for schema, word in (({"type": "string", "pattern": "^a"}, "pattern"),
                         ({"type": "object", "properties": {"x": {"type": "number", "minimum": 0}}}, "minimum"),
                         ({"oneOf": [{"type": "string"}]}, "oneOf"),
                         ({"type": "string", "format": "date"}, "format"),
                         ({"type": "array", "prefixItems": [{}]}, "prefixItems"),
                         ({"$ref": "https://example.com/s.json"}, "$ref"),
                         ({"type": "tuple"}, "tuple")):
        with pytest.raises(GrammarError, match=word.replace("$", r"\$")):
            json_schema_to_gbnf(schema)
        with pytest.raises(ValueError, match=word.replace("$", r"\$")):   # GrammarError is a ValueError
            llm.create_chat_completion([{"role": "user", "content": "hi"}], max_tokens=2,
                                       response_format={"type": "json_schema", "json_schema": {"schema": schema}})
    with pytest.raises(GrammarError, match="required"):
        json_schema_to_gbnf({"type": "object", "properties": {"a": {}}, "required": ["b"]})
    with pytest.raises(GrammarError, match="regex"):
        response_format_grammar({"type": "regex"})
    assert response_format_grammar({"type": "text"}) is None


# ------------------------------------------------------------------ generation under a grammar
def check_schema(value, schema, defs):
    """The value against SCHEMA's subset (a test oracle, independent of the converter)."""
    if "$ref" in schema:
        return check_schema(value, defs[schema["$ref"].rsplit("/", 1)[1]], defs)
    if "const" in schema:
        return value == schema["const"]
    if "enum" in schema:
        return value in schema["enum"]
    t = schema.get("type")
    if isinstance(t, list):
        return any(check_schema(value, {**schema, "type": x}, defs) for x in t)
    if t == "object":
        props = schema.get("properties", {})
        return (isinstance(value, dict) and set(value) <= set(props) and set(schema.get("required", [])) <= set(value)
                and all(check_schema(v, props[k], defs) for k, v in value.items()))
    if t == "array":
        return (isinstance(value, list) and schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", 1 << 30)
                and all(check_schema(v, schema.get("items", {}), defs) for v in value))
    if t == "string":
        # (a random model emits bytes that are no UTF-8: llama.cpp's grammar counts them as code points
        # of its own, the text holds U+FFFD for them -- then the length is not comparable)
        return isinstance(value, str) and ("\ufffd" in value or len(value) <= schema.get("maxLength", 1 << 30))
    if t == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if t == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if t == "boolean":
        return isinstance(value, bool)
    if t == "null":
        return value is None
    return True


def test_response_format_json_schema_forces_valid_json(llm):
    """Greedy and sampled, chat and completion: the text parses and matches the schema (a random
    model: only the grammar makes it JSON)."""
    from tca_ggml.grammar import LlamaGrammar, json_schema_to_gbnf
    msgs = [{"role": "user", "content": PROMPT}]
    for fmt in ({"type": "json_schema", "json_schema": {"name": "t", "schema": BOOL_SCHEMA}},
                {"type": "json_object", "schema": BOOL_SCHEMA}):     # llama-cpp-python's form
        r = llm.create_chat_completion(msgs, max_tokens=200, temperature=0, response_format=fmt)
        c = r["choices"][0]
        assert c["finish_reason"] == "stop"
        assert isinstance(json.loads(c["message"]["content"])["a"], bool)
    for seed in range(4):
        r = llm.create_chat_completion(msgs, max_tokens=400, temperature=1.0, seed=seed,
                                       response_format={"type": "json_schema", "json_schema": {"schema": SCHEMA}})
        c = r["choices"][0]
        assert c["finish_reason"] == "stop", c
        assert check_schema(json.loads(c["message"]["content"]), SCHEMA, SCHEMA["$defs"]), c["message"]["content"]
    # create_completion(grammar=...): GBNF text, or a LlamaGrammar; streamed too; with logprobs
    g = json_schema_to_gbnf(BOOL_SCHEMA)
    a = llm.create_completion(PROMPT, max_tokens=200, temperature=0, grammar=g, logprobs=1)["choices"][0]
    b = llm.create_completion(PROMPT, max_tokens=200, temperature=0, grammar=LlamaGrammar.from_json_schema(BOOL_SCHEMA))
    s = "".join(ch["choices"][0]["text"] for ch in
                llm.create_completion(PROMPT, max_tokens=200, temperature=0, grammar=g, stream=True))
    assert a["text"] == b["choices"][0]["text"] == s and isinstance(json.loads(s)["a"], bool)
    # the grammar masks tokens; the logprobs are still those of the raw logits (may be below the top)
    assert "".join(a["logprobs"]["tokens"]) == a["text"]
    assert all(lp <= max(top.values()) + 1e-9 for lp, top in zip(a["logprobs"]["token_logprobs"],
                                                                 a["logprobs"]["top_logprobs"]))
    # no grammar: the same prompt gives no JSON (the grammar did it)
    plain = llm.create_completion(PROMPT, max_tokens=20, temperature=0)["choices"][0]["text"]
    with pytest.raises(ValueError):
        json.loads(plain)


def test_json_object_gives_json_objects(llm):
    """response_format json_object (the generic grammar, an object at the root): every answer that
    ends (finish "stop") is a JSON object; one that runs out of tokens is still one's beginning."""
    ended = 0
    for i in range(8):
        r = llm.create_chat_completion([{"role": "user", "content": f"{i} {PROMPT}"}], max_tokens=120,
                                       temperature=0.7, seed=i, response_format={"type": "json_object"})
        c = r["choices"][0]
        text = c["message"]["content"]
        assert text.startswith("{")
        if c["finish_reason"] == "stop":
            assert isinstance(json.loads(text), dict)
            ended += 1
    assert ended >= 1


def test_invalid_grammars_raise_and_the_llama_goes_on(llm):
    from tca_ggml.grammar import GrammarError
    want = llm.create_completion(PROMPT, max_tokens=4, temperature=0)["choices"][0]["text"]
    for g, msg in (('root ::= foo', "'foo'"), ('root ::= "a', "parser"), ('start ::= "a"', "root"),
                   ('root ::= "a"{3,1}', "maximum below"), ('root ::= [a-', "parser"), ('', "empty"),
                   ('root ::= "a" )', "parser")):
        with pytest.raises(GrammarError, match=msg):
            llm.create_completion(PROMPT, max_tokens=4, grammar=g)
        with pytest.raises(GrammarError):
            llm.check_grammar(g)
    with pytest.raises(TypeError):
        llm.create_completion(PROMPT, max_tokens=4, grammar=123)
    # a grammar no token of the vocabulary can start (a NUL byte): an error at the first step, not a crash
    for g in ('root ::= "\\x00"', 'root ::= <[999999]>'):
        llm.check_grammar(g)   # it parses
        with pytest.raises(GrammarError, match="allows no token"):
            llm.create_completion(PROMPT, max_tokens=4, grammar=g)
    with pytest.raises(ValueError, match="not both"):
        llm.create_chat_completion([{"role": "user", "content": "hi"}], max_tokens=2, grammar='root ::= "a"',
                                   response_format={"type": "json_object"})
    assert llm.create_completion(PROMPT, max_tokens=4, temperature=0)["choices"][0]["text"] == want


def test_grammar_with_penalties_and_history(llm):
    """The prompt's tokens go to the penalties, never to the grammar (a prompt that is no sentence of
    the grammar works), and the grammar still holds with penalties that push away its only tokens."""
    g = 'root ::= "ab" ("ab")* "."'
    r = llm.create_completion("zzzz not the grammar", max_tokens=9, temperature=0, repeat_penalty=1.5,
                              frequency_penalty=1.0, grammar=g)["choices"][0]
    t = r["text"]
    assert t.startswith("ab") and set(t) <= set("ab.") and (r["finish_reason"] == "length" or t.endswith("."))


# ------------------------------------------------------------------ the server
@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    from test_server import _need_server_packages, start_server
    _need_server_packages()
    p, url = start_server(tiny, tmp_path_factory.mktemp("log") / "server.log")
    yield url
    p.terminate()
    p.wait(30)


@pytest.fixture(scope="module")
def client(server):
    import openai
    return openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=120)


def test_server_completion_logprobs(client, tiny):
    """/v1/completions logprobs (a slot: a sequence view of a TCA context), streamed and not; against a
    local Llama of the same configuration."""
    from tca_ggml import Llama
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=4)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == 6 and all(r.choices[0].text[o - len(PROMPT):].startswith(t)
                                               for o, t in zip(lp.text_offset, lp.tokens))
    assert all(1 <= len(t) <= 5 for t in lp.top_logprobs) and lp.text_offset[0] == len(PROMPT)
    local = Llama(tiny, n_ctx=1024, n_threads=1, verbose=False, tca=True, tca_density=0.25, tca_window=64, tca_block=16)
    try:
        want = local.create_completion(PROMPT, max_tokens=6, temperature=0, logprobs=4)["choices"][0]
    finally:
        local.close()
    assert r.choices[0].text == want["text"] and lp.tokens == want["logprobs"]["tokens"]
    assert lp.token_logprobs == pytest.approx(want["logprobs"]["token_logprobs"], abs=2e-4)
    toks, vals = [], []
    for ch in client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=4,
                                        stream=True):
        if ch.choices and ch.choices[0].logprobs:
            toks += ch.choices[0].logprobs.tokens
            vals += ch.choices[0].logprobs.token_logprobs
    assert toks == lp.tokens and vals == pytest.approx(lp.token_logprobs, abs=1e-6)


def test_server_chat_logprobs_and_response_format(client):
    msgs = [{"role": "user", "content": PROMPT}]
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=5, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    assert b"".join(bytes(e.bytes) for e in content).decode("utf-8", "replace") == r.choices[0].message.content
    for e in content:
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob == pytest.approx(e.logprob)
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)
    streamed = []
    for ch in client.chat.completions.create(model="tiny", messages=msgs, max_tokens=5, temperature=0, logprobs=True,
                                             top_logprobs=3, stream=True):
        if ch.choices and ch.choices[0].logprobs:
            streamed += ch.choices[0].logprobs.content
    assert [(e.token, e.bytes) for e in streamed] == [(e.token, e.bytes) for e in content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-6)
    assert r.choices[0].logprobs is not None and client.chat.completions.create(
        model="tiny", messages=msgs, max_tokens=2, temperature=0).choices[0].logprobs is None
    # response_format: OpenAI's json_schema form, streamed and not
    fmt = {"type": "json_schema", "json_schema": {"name": "t", "schema": BOOL_SCHEMA}}
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=200, temperature=0, response_format=fmt)
    assert r.choices[0].finish_reason == "stop" and isinstance(json.loads(r.choices[0].message.content)["a"], bool)
    text = "".join(ch.choices[0].delta.content or "" for ch in client.chat.completions.create(
        model="tiny", messages=msgs, max_tokens=200, temperature=0, response_format=fmt, stream=True) if ch.choices)
    assert text == r.choices[0].message.content
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=60, temperature=0,
                                       response_format={"type": "json_object"})
    assert r.choices[0].message.content.startswith("{")
    # llama-cpp-python's grammar extension, on /v1/completions
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0,
                                  extra_body={"grammar": 'root ::= "yes" | "no"'})
    assert r.choices[0].text in ("yes", "no") and r.choices[0].finish_reason == "stop"


def test_server_bad_logprobs_and_grammars_are_400s(server, client):
    import openai
    from test_server import _post_raw
    msgs = [{"role": "user", "content": "hi"}]
    cases = [("completions", dict(prompt="hi", logprobs=21), "logprobs", "invalid_value"),
             ("completions", dict(prompt="hi", logprobs=-1), "logprobs", "invalid_value"),
             ("completions", dict(prompt="hi", logprobs="2"), "logprobs", "invalid_type"),
             ("completions", dict(prompt="hi", logprobs=2, echo=True), "logprobs", "unsupported_parameter"),
             ("completions", dict(prompt="hi", grammar="root ::= foo"), "grammar", "invalid_value"),
             ("completions", dict(prompt="hi", grammar='root ::= "a"{3,1}'), "grammar", "invalid_value"),
             ("completions", dict(prompt="hi", grammar=5), "grammar", "invalid_type"),
             ("chat/completions", dict(messages=msgs, logprobs=True, top_logprobs=21), "top_logprobs", "invalid_value"),
             ("chat/completions", dict(messages=msgs, top_logprobs=2), "top_logprobs", "invalid_value"),
             ("chat/completions", dict(messages=msgs, logprobs=3), "logprobs", "invalid_type"),
             ("chat/completions", dict(messages=msgs, response_format={"type": "json_schema", "json_schema": {
                 "schema": {"type": "string", "pattern": "a+"}}}), "response_format", "unsupported_parameter"),
             ("chat/completions", dict(messages=msgs, response_format={"type": "json_schema"}), "response_format",
              "invalid_value"),
             ("chat/completions", dict(messages=msgs, response_format={"type": "regex"}), "response_format",
              "unsupported_parameter"),
             ("chat/completions", dict(messages=msgs, response_format={"type": "json_object"}, grammar='root ::= "a"'),
              "grammar", "invalid_value")]
    for path, body, param, code in cases:
        st, out = _post_raw(f"{server}/v1/{path}", json.dumps({"model": "tiny", "max_tokens": 4, **body}).encode())
        assert st == 400 and out["error"]["param"] == param and out["error"]["code"] == code, (body, out)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=msgs, max_tokens=4, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer", "minimum": 1}}})
    assert e.value.param == "response_format" and "minimum" in e.value.message
    # still serving
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3, temperature=0)
    assert r.choices[0].text and r.choices[0].finish_reason == "length"


# ------------------------------------------------------------------ a real model
def test_json_object_with_a_real_model(default_model):
    """The default model (Qwen2.5-Coder 0.5B), response_format json_object: a JSON object, parsed
    (17 tokens, about 2 s on one thread; one thread: two spin-waiting ones crawl on a busy machine)."""
    from tca_ggml import Llama
    with Llama(default_model, n_ctx=1024, n_threads=1, n_threads_batch=1, verbose=False) as m:
        r = m.create_chat_completion([{"role": "user", "content": "Give the name and age of a fictional person."}],
                                     max_tokens=160, temperature=0, response_format={"type": "json_object"},
                                     logprobs=True, top_logprobs=2)
        c = r["choices"][0]
        assert c["finish_reason"] == "stop", c
        assert isinstance(json.loads(c["message"]["content"]), dict)
        lps = [e["logprob"] for e in c["logprobs"]["content"]]
        assert len(lps) == r["usage"]["completion_tokens"] and all(math.isfinite(x) and x <= 0 for x in lps)
