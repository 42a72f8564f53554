"""Constrained generation: GBNF grammars for llama.cpp's grammar sampler, and JSON.

``Llama.create_completion(grammar=...)`` and ``create_chat_completion(response_format=...)`` put
llama.cpp's grammar sampler (``llama_sampler_init_grammar``) in the sampler chain, after the
penalties and before top-k / temperature / the final pick, as llama-cpp-python does. This module
makes the grammars:

- ``JSON_GBNF``: any JSON value (``root``); ``JSON_OBJECT_GBNF``: a JSON object at the root
  (``response_format={"type": "json_object"}``);
- ``json_schema_to_gbnf(schema)``: a grammar whose sentences are JSON texts valid against a subset of
  JSON Schema: ``type`` (object, array, string, number, integer, boolean, null, or a list of them),
  ``properties`` / ``required`` (properties in the schema's order, the optional ones may be left
  out; no other keys are generated), ``additionalProperties`` (the value schema of an object without
  ``properties``), ``items``, ``minItems`` / ``maxItems``, ``minLength`` / ``maxLength``, ``enum``,
  ``const``, ``anyOf``, local ``$ref`` (``#/$defs/...``, recursion allowed); annotations (``title``,
  ``description``, ``default``, ``examples``, ...) are ignored. Any other keyword (``pattern``,
  ``format``, ``minimum``, ``oneOf``, ``allOf``, ``prefixItems``, ...) is a ``GrammarError`` (a
  ``ValueError``) that names it: the grammar would otherwise allow texts the schema refuses.

Whitespace between tokens is bounded (at most 20 characters), and so are the digits of a number,
so that a model cannot loop forever inside one; strings are unbounded (``maxLength`` bounds them).
A ``grammar`` argument is GBNF text (llama.cpp's grammars/README.md), or an object with llama-cpp-
python's ``LlamaGrammar`` attributes ``_grammar`` (the text) and ``_root`` (``LlamaGrammar`` below
is such an object: ``from_string``, ``from_json_schema``).
"""
from __future__ import annotations

import json
import re
from typing import Any, Dict, List, Optional, Tuple

from .errors import TCAError


class GrammarError(TCAError, ValueError):
    """A grammar llama.cpp's parser refuses, an invalid JSON schema or response_format, or a
    grammar that allows no token where generation stands."""


class UnsupportedSchemaError(GrammarError):
    """A JSON schema keyword (or response_format type) outside what json_schema_to_gbnf implements."""


_WS = 'ws ::= [ \\t\\n]{0,20}'
_SCALARS = r'''
string ::= "\"" char* "\""
char ::= [ !#-\[\]-~\xA0-\uD7FF\uE000-\U0010FFFF] | "\\" (["\\/bfnrt] | "u" hex hex hex hex)
hex ::= [0-9a-fA-F]
integer ::= "-"? ("0" | [1-9] [0-9]{0,15})
number ::= integer ("." [0-9]{1,16})? ([eE] [-+]? [0-9]{1,3})?
boolean ::= "true" | "false"
null ::= "null"
'''.strip()
_GENERIC = r'''
value ::= object | array | string | number | boolean | null
object ::= "{" ws (member (ws "," ws member)* ws)? "}"
member ::= string ws ":" ws value
array ::= "[" ws (value (ws "," ws value)* ws)? "]"
'''.strip()

JSON_GBNF = "root ::= value\n" + _GENERIC + "\n" + _SCALARS + "\n" + _WS + "\n"
JSON_OBJECT_GBNF = "root ::= object\n" + _GENERIC + "\n" + _SCALARS + "\n" + _WS + "\n"

# keywords that only describe (no constraint on the text)
_ANNOTATIONS = {"title", "description", "default", "examples", "$comment", "$schema", "$id", "deprecated",
                "readOnly", "writeOnly", "$defs", "definitions"}
# the constraint keywords this converter implements, per type (others are refused by name)
_TYPE_KEYWORDS = {
    "object": {"properties", "required", "additionalProperties"},
    "array": {"items", "minItems", "maxItems"},
    "string": {"minLength", "maxLength"},
    "number": set(), "integer": set(), "boolean": set(), "null": set(),
}
_MAX_REPEAT = 1000   # minItems / maxItems / minLength / maxLength (llama.cpp's parser caps repetitions)


def gbnf_literal(text: str) -> str:
    """`text` as a GBNF string literal."""
    out = []
    for ch in text:
        if ch == "\\":
            out.append("\\\\")
        elif ch == '"':
            out.append('\\"')
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _json_literal(value: Any) -> str:
    """The compact JSON text of `value`, as a GBNF literal (enum / const: that exact text)."""
    try:
        return gbnf_literal(json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False))
    except (TypeError, ValueError) as e:
        raise GrammarError(f"enum/const value {value!r} is not JSON: {e}") from None


class _Converter:
    def __init__(self, root_schema: Any):
        self.root = root_schema
        self.rules: Dict[str, str] = {}
        self.refs: Dict[str, str] = {}     # $ref -> rule name (recursion: named before it is built)

    def name(self, hint: str) -> str:
        base = re.sub(r"[^a-zA-Z0-9]+", "-", hint).strip("-").lower() or "r"
        if base in ("root", "ws", "value", "object", "member", "array", "string", "char", "hex", "integer",
                    "number", "boolean", "null"):
            base = "s-" + base
        n, i = base, 1
        while n in self.rules:
            i += 1
            n = f"{base}-{i}"
        self.rules[n] = ""   # reserved
        return n

    def add(self, hint: str, body: str) -> str:
        n = self.name(hint)
        self.rules[n] = body
        return n

    def resolve(self, ref: str, where: str) -> Any:
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise UnsupportedSchemaError(f"{where}: $ref {ref!r} is not supported (only local references, '#/...')")
        node = self.root
        for part in ref[1:].split("/")[1:] if ref != "#" else []:
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                raise GrammarError(f"{where}: $ref {ref!r} does not resolve in the schema")
        return node

    @staticmethod
    def repeat(item: str, lo: int, hi: Optional[int], sep: Optional[str] = None) -> str:
        """`item` lo..hi times (hi None: no bound), separated by `sep` (and whitespace) when given;
        "" when hi is 0."""
        def times(x: str, a: int, b: Optional[int]) -> str:
            if b == 0:
                return ""
            if (a, b) == (0, None):
                return f"({x})*"
            if (a, b) == (1, None):
                return f"({x})+"
            if (a, b) == (0, 1):
                return f"({x})?"
            return f"({x}){{{a},{'' if b is None else b}}}" if a != b else f"({x}){{{a}}}"
        if sep is None:
            return times(item, lo, hi)
        if hi == 0:
            return ""
        tail = times(f"ws {sep} ws {item}", max(lo - 1, 0), None if hi is None else hi - 1)
        body = f"{item} {tail}".strip()
        return body if lo >= 1 else f"({body})?"

    def count(self, schema: Dict[str, Any], key: str, where: str) -> Optional[int]:
        v = schema.get(key)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int) or v < 0 or v > _MAX_REPEAT:
            raise GrammarError(f"{where}: {key} must be an integer in [0, {_MAX_REPEAT}], got {v!r}")
        return v

    def visit(self, schema: Any, where: str) -> str:
        """A GBNF expression (a rule name or an inline group) for the JSON texts valid against `schema`."""
        if schema is True or schema == {}:
            return "value"
        if schema is False:
            raise GrammarError(f"{where}: the schema `false` allows no value")
        if not isinstance(schema, dict):
            raise GrammarError(f"{where}: a schema must be an object (or true), got {type(schema).__name__}")
        if "$ref" in schema:
            extra = set(schema) - {"$ref"} - _ANNOTATIONS
            if extra:
                raise UnsupportedSchemaError(f"{where}: keywords beside $ref are not supported: {sorted(extra)}")
            ref = schema["$ref"]
            if ref not in self.refs:
                target = self.resolve(ref, where)
                n = self.name("ref-" + ref.rsplit("/", 1)[-1])
                self.refs[ref] = n
                self.rules[n] = self.visit(target, f"{where} -> {ref}")
            return self.refs[ref]
        if "const" in schema or "enum" in schema:
            key = "const" if "const" in schema else "enum"
            allowed = {key, "type"}
            if isinstance(schema.get("type"), str):
                allowed |= _TYPE_KEYWORDS.get(schema["type"], set())
            self._only(schema, allowed, where)
            if key == "const":
                return _json_literal(schema["const"])
            vals = schema["enum"]
            if not isinstance(vals, list) or not vals:
                raise GrammarError(f"{where}: enum must be a non-empty list")
            return "(" + " | ".join(_json_literal(v) for v in vals) + ")"
        if "anyOf" in schema:
            alts = schema["anyOf"]
            if not isinstance(alts, list) or not alts:
                raise GrammarError(f"{where}: anyOf must be a non-empty list of schemas")
            self._only(schema, {"anyOf"}, where)
            return "(" + " | ".join(self.visit(s, f"{where}.anyOf[{i}]") for i, s in enumerate(alts)) + ")"
        t = schema.get("type")
        if t is None:   # the type from the keywords present
            if "properties" in schema or "required" in schema or "additionalProperties" in schema:
                t = "object"
            elif "items" in schema or "minItems" in schema or "maxItems" in schema:
                t = "array"
            elif "minLength" in schema or "maxLength" in schema:
                t = "string"
            else:
                self._only(schema, set(), where)
                return "value"
        if isinstance(t, list):
            if not t or not all(isinstance(x, str) for x in t):
                raise GrammarError(f"{where}: type must be a string or a non-empty list of strings")
            if len(t) > 1:   # each type with its own keywords
                own = set().union(*_TYPE_KEYWORDS.values())
                return "(" + " | ".join(self.visit({k: v for k, v in schema.items()
                                                    if k not in own or k in _TYPE_KEYWORDS.get(x, ())} | {"type": x},
                                                   where) for x in t) + ")"
            t = t[0]
        if t not in _TYPE_KEYWORDS:
            raise GrammarError(f"{where}: type {t!r} is not a JSON Schema type")
        self._only(schema, {"type"} | _TYPE_KEYWORDS[t], where)
        if t == "object":
            return self.object(schema, where)
        if t == "array":
            lo = self.count(schema, "minItems", where) or 0
            hi = self.count(schema, "maxItems", where)
            if hi is not None and hi < lo:
                raise GrammarError(f"{where}: maxItems {hi} < minItems {lo}")
            item = self.visit(schema.get("items", True), f"{where}.items")
            inner = self.repeat(item, lo, hi, sep='","')
            return self.add(where + "-array", f'"[" ws {inner} ws "]"' if inner else '"[" ws "]"')
        if t == "string":
            lo = self.count(schema, "minLength", where) or 0
            hi = self.count(schema, "maxLength", where)
            if hi is not None and hi < lo:
                raise GrammarError(f"{where}: maxLength {hi} < minLength {lo}")
            if lo == 0 and hi is None:
                return "string"
            return self.add(where + "-string", f'"\\"" {self.repeat("char", lo, hi)} "\\""')
        return t

    def object(self, schema: Dict[str, Any], where: str) -> str:
        props = schema.get("properties")
        required = schema.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise GrammarError(f"{where}: required must be a list of property names")
        if props is None:
            if required:
                raise UnsupportedSchemaError(f"{where}: required {required} without properties is not supported")
            extra = schema.get("additionalProperties", True)
            if extra is False:
                return '("{" ws "}")'
            val = self.visit(extra, f"{where}.additionalProperties")
            member = f'string ws ":" ws {val}'
            return self.add(where + "-object", f'"{{" ws ({member} (ws "," ws {member})* ws)? "}}"')
        if not isinstance(props, dict):
            raise GrammarError(f"{where}: properties must be an object")
        missing = [r for r in required if r not in props]
        if missing:
            raise GrammarError(f"{where}: required {missing} not among its properties")
        names = list(props)
        kv = [f'{gbnf_literal(json.dumps(k, ensure_ascii=False))} ws ":" ws {self.visit(props[k], f"{where}.{k}")}'
              for k in names]
        req = [k in required for k in names]
        n = len(names)
        if n == 0:
            return '("{" ws "}")'
        # nxt[i]: members i.. after at least one was written (each after a comma);
        # fst[i]: members i.. before any (the first one written has no comma). Optional members may be
        # left out; the required ones may not. Rules named, so that the size stays linear in n.
        nxt: List[Optional[str]] = [None] * (n + 1)
        for i in range(n - 1, -1, -1):
            part = f'ws "," ws {kv[i]}'
            tail = f" {nxt[i + 1]}" if nxt[i + 1] else ""
            nxt[i] = self.add(f"{where}-next-{i}", f"{part}{tail}" if req[i] else f"({part})?{tail}")
        fst: List[Optional[str]] = [None] * (n + 1)
        for i in range(n - 1, -1, -1):
            here = f"{kv[i]} {nxt[i + 1]}" if nxt[i + 1] else kv[i]
            skip = not req[i] and fst[i + 1] is not None
            fst[i] = self.add(f"{where}-first-{i}", f"{here} | {fst[i + 1]}" if skip else here)
        any_required = any(req)
        inner = fst[0] if any_required else f"({fst[0]})?"
        return self.add(where + "-object", f'"{{" ws {inner} ws "}}"')

    @staticmethod
    def _only(schema: Dict[str, Any], allowed: set, where: str) -> None:
        bad = sorted(k for k in schema if k not in allowed and k not in _ANNOTATIONS)
        if bad:
            raise UnsupportedSchemaError(f"{where}: JSON Schema keyword {bad[0]!r} is not supported "
                               f"(supported: type, properties, required, additionalProperties, items, minItems, "
                               f"maxItems, minLength, maxLength, enum, const, anyOf, $ref)")


def json_schema_to_gbnf(schema: Any) -> str:
    """A GBNF grammar (root rule ``root``) whose sentences are the JSON texts valid against
    `schema` (a dict, or its JSON text) -- for the subset described in this module's docstring;
    GrammarError naming the first keyword outside it."""
    if isinstance(schema, (str, bytes)):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise GrammarError(f"the JSON schema is not valid JSON: {e}") from None
    c = _Converter(schema)
    top = c.visit(schema, "schema")
    lines = [f"root ::= {top}"]
    lines += [f"{k} ::= {v}" for k, v in c.rules.items()]
    lines += [_GENERIC, _SCALARS, _WS]   # the shared rules (unused ones are harmless)
    return "\n".join(lines) + "\n"


def response_format_grammar(response_format: Any) -> Optional[str]:
    """The grammar of an OpenAI ``response_format`` (None for text): ``{"type": "json_object"}``
    (llama-cpp-python's ``"schema"`` key beside it is honoured), ``{"type": "json_schema",
    "json_schema": {"schema": {...}, ...}}``. GrammarError for anything else."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise GrammarError("response_format must be an object such as {\"type\": \"json_object\"}")
    t = response_format.get("type")
    if t == "text":
        return None
    if t == "json_object":
        if response_format.get("schema") is not None:
            return json_schema_to_gbnf(response_format["schema"])
        return JSON_OBJECT_GBNF
    if t == "json_schema":
        js = response_format.get("json_schema")
        if not isinstance(js, dict) or "schema" not in js:
            raise GrammarError("response_format json_schema needs {\"json_schema\": {\"schema\": {...}}}")
        return json_schema_to_gbnf(js["schema"])
    raise UnsupportedSchemaError(f"response_format type {t!r} is not supported (text, json_object, json_schema)")


# ---------------------------------------------------------------- grammar arguments
class LlamaGrammar:
    """A GBNF grammar, as llama-cpp-python's ``LlamaGrammar`` (``_grammar``, ``_root``): for code
    that builds one with ``LlamaGrammar.from_string`` / ``from_json_schema``. A plain string works too."""

    def __init__(self, *, _grammar: str, _root: str = "root"):
        self._grammar, self._root = _grammar, _root

    @classmethod
    def from_string(cls, grammar: str, verbose: bool = True) -> "LlamaGrammar":
        return cls(_grammar=grammar_text(grammar)[0])

    @classmethod
    def from_json_schema(cls, json_schema: Any, verbose: bool = True) -> "LlamaGrammar":
        return cls(_grammar=json_schema_to_gbnf(json_schema))


_REPEAT = re.compile(r"\{\s*(\d+)\s*,\s*(\d+)\s*\}")
_NAME = re.compile(r"[a-zA-Z0-9_-]+")
_DEFINE = re.compile(r"\s*::=")


def _precheck(text: str, root: str) -> None:
    """What llama.cpp's parser would not say clearly (its message goes to stderr) or would not
    survive: a repetition ``x{m,n}`` with n < m (the parser then loops forever, allocating), the
    root rule missing, a rule referenced but not defined. String literals, character classes,
    token references and comments are skipped; anything else is left to the parser."""
    defined, used = set(), {}
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "#":
            j = text.find("\n", i)
            i = n if j < 0 else j + 1
        elif ch in "\"[":
            close = '"' if ch == '"' else "]"
            i += 1
            while i < n and text[i] != close:
                i += 2 if text[i] == "\\" else 1
            i += 1
        elif ch == "<":
            j = text.find(">", i)
            i = n if j < 0 else j + 1
        elif ch == "{":
            m = _REPEAT.match(text, i)
            if m and int(m.group(2)) < int(m.group(1)):
                raise GrammarError(f"invalid grammar: repetition {m.group(0)} has its maximum below its minimum")
            j = text.find("}", i)
            i = n if j < 0 else j + 1
        else:
            m = _NAME.match(text, i)
            if m:
                name, i = m.group(0), m.end()
                if _DEFINE.match(text, i):
                    defined.add(name)
                elif not name.isdigit():
                    used.setdefault(name, None)
            else:
                i += 1
    if root not in defined:
        raise GrammarError(f"invalid grammar: no rule {root!r} (the root rule) is defined")
    undefined = [u for u in used if u not in defined]
    if undefined:
        raise GrammarError(f"invalid grammar: rule {undefined[0]!r} is used but not defined")


def grammar_text(grammar: Any) -> Tuple[str, str]:
    """(GBNF text, root rule) of a ``grammar`` argument: a str, or an object with ``_grammar``
    (and ``_root``) such as llama-cpp-python's ``LlamaGrammar``."""
    root = "root"
    if not isinstance(grammar, str):
        text = getattr(grammar, "_grammar", None)
        if not isinstance(text, str):
            raise TypeError(f"grammar must be a GBNF string or a LlamaGrammar, got {type(grammar).__name__}")
        root = getattr(grammar, "_root", "root") or "root"
        if not isinstance(root, str):
            raise TypeError("grammar._root must be a str")
        grammar = text
    if not grammar.strip():
        raise GrammarError("the grammar is empty")
    if "\x00" in grammar or "\x00" in root:
        raise GrammarError("the grammar contains a NUL character")
    _precheck(grammar, root)
    return grammar, root
