"""Quality of TCA against dense attention on one model: `tca-ggml eval`.

Two arms on the same prompts, the same n_ctx and threads, greedy decoding:
  dense  `Llama(model)` (upstream attention; flash attention only with --flash-attn)
  TCA    `Llama(model, tca=True)` with the GGUF's calibrated budgets, or with `--tca-density X`
         a forced uniform budget (reported as "forced density X (uncalibrated)")

Instruments (all text generated locally from a fixed seed, no downloads beyond the essays):
  niah   needle in a haystack: lengths x depths x needle kinds (a number, a UUID-like key, a
         sentence fact) planted in Paul Graham's essays; exact match of the needle value.
  ruler  RULER-style synthetic tasks: niah_single, niah_multikey, niah_multivalue, vt
         (variable tracking), cwe (common-words extraction); score = share of expected
         items present in the answer.
  kl     logit fidelity on natural text (essays): prefill L-M tokens, then decode the true
         text token by token and read the logits after each step: KL(dense || TCA), top-1
         agreement, perplexity of both arms on the true next tokens.
After every TCA run the per-layer coverage and the kept share of the KV rows are recorded.

Lengths are prompt lengths in tokens (chat template and question included for niah/ruler).
"""
from __future__ import annotations

import bisect
import json
import os
import random
import re
import string
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

TASKS = ("niah", "ruler", "kl")
RULER_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "vt", "cwe")
NEEDLE_KINDS = ("number", "key", "fact")
MIN_LENGTH = 256

FULL = dict(lengths=[1024, 2048, 4096, 8192], depths=[0.0, 0.25, 0.5, 0.75, 1.0],
            needles=list(NEEDLE_KINDS), ruler=list(RULER_TASKS), kl_positions=64)
QUICK = dict(lengths=[768, 1536], depths=[0.0, 0.5, 1.0], needles=["number"],
             ruler=["niah_multikey", "vt"], kl_positions=16, window=256, block=64)

# answer budgets (tokens) per task
MAX_TOKENS = {"niah": 24, "niah_single": 24, "niah_multikey": 24, "niah_multivalue": 64, "vt": 48, "cwe": 64}

_FACTS = [  # (subject, activity, the part that must appear in the answer)
    ("San Francisco", "eat a sandwich and sit in Dolores Park on a sunny day", "Dolores Park"),
    ("Lisbon", "ride tram 28 up to the Graca viewpoint at dusk", "tram 28"),
    ("Kyoto", "walk the Philosopher's Path early in the morning", "Philosopher's Path"),
    ("Reykjavik", "soak in the Sky Lagoon after a long hike", "Sky Lagoon"),
    ("Montreal", "eat a bagel from Fairmount Bakery in the snow", "Fairmount"),
    ("Edinburgh", "climb Arthur's Seat before breakfast", "Arthur's Seat"),
]
_VT_NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


class EvalInputError(ValueError):
    """Bad arguments to the evaluation (reported by the CLI as `error: ...`, exit code 2)."""


# ------------------------------------------------------------------------------ config
@dataclass
class EvalConfig:
    model: str
    quick: bool = False
    lengths: List[int] = field(default_factory=list)
    depths: List[float] = field(default_factory=list)
    tasks: List[str] = field(default_factory=list)         # subset of TASKS
    needles: List[str] = field(default_factory=list)
    ruler_tasks: List[str] = field(default_factory=list)
    ruler_lengths: List[int] = field(default_factory=list)
    kl_lengths: List[int] = field(default_factory=list)
    kl_positions: int = 64
    tca_density: Optional[float] = None
    tca_window: Optional[int] = None
    tca_block: Optional[int] = None
    seed: int = 0
    threads: int = 1
    flash_attn: bool = False
    n_ctx: int = 0
    n_ctx_train: int = 0
    n_ubatch: int = 512             # TCA selects with the last query of each ubatch


def _resolve_model(model: str) -> str:
    from . import models
    if model and os.path.isfile(model):
        return os.path.abspath(model)
    if model in models.MODELS:
        return str(models.fetch(model, quiet=True))
    if model and os.path.isdir(model):
        raise EvalInputError(f"model path is a directory: {model}")
    raise EvalInputError(f"model not found: {model} (a GGUF file, or one of: {', '.join(models.MODELS)})")


def _n_ctx_train(path: str) -> int:
    """`{arch}.context_length` of a GGUF (0 if absent)."""
    from . import gguf_meta
    try:
        arch, _, _ = gguf_meta.read_model_shape(path)
        lay = gguf_meta._scan(path, refuse_huge_tca=False)
        kv = lay.kv.get(f"{arch}.context_length")
        if kv is None:
            return 0
        with open(path, "rb") as f:
            return int(gguf_meta._read_value(f, lay, kv))
    except Exception as e:
        raise EvalInputError(f"{path}: cannot read the model's metadata: {e}") from e


def make_config(model: str, *, quick: bool = False, lengths: Optional[Sequence[int]] = None,
                depths: Optional[Sequence[float]] = None, tasks: Optional[Sequence[str]] = None,
                needles: Optional[Sequence[str]] = None, kl_positions: Optional[int] = None,
                tca_density: Optional[float] = None, tca_window: Optional[int] = None,
                tca_block: Optional[int] = None, seed: int = 0, threads: Optional[int] = None,
                flash_attn: bool = False, n_ctx: Optional[int] = None,
                n_ubatch: Optional[int] = None) -> EvalConfig:
    """Validate everything (before any model is run) and fill the defaults. Raises
    EvalInputError (a ValueError) with a clear message on bad input."""
    from .llama import Llama
    d = QUICK if quick else FULL
    lengths = list(d["lengths"] if lengths is None else lengths)
    depths = list(d["depths"] if depths is None else depths)
    needles = list(d["needles"] if needles is None else needles)
    if not lengths:
        raise EvalInputError("no lengths given")
    for L in lengths:
        if isinstance(L, bool) or not isinstance(L, int) or L < MIN_LENGTH:
            raise EvalInputError(f"length {L!r} is too short: lengths are prompt tokens, >= {MIN_LENGTH}")
    lengths = sorted(set(lengths))
    if not depths:
        raise EvalInputError("no depths given")
    for x in depths:
        if not isinstance(x, (int, float)) or isinstance(x, bool) or not (0.0 <= float(x) <= 1.0) \
                or x != x:
            raise EvalInputError(f"depth {x!r} is outside [0, 1]")
    depths = sorted(set(float(x) for x in depths))
    for k in needles:
        if k not in NEEDLE_KINDS:
            raise EvalInputError(f"unknown needle kind {k!r}; known: {', '.join(NEEDLE_KINDS)}")
    # tasks: niah, ruler, kl, or single RULER task names (which select RULER with only those)
    tasks = list(TASKS if tasks is None else tasks)
    if not tasks:
        raise EvalInputError("no tasks given")
    top, ruler_sel = [], []
    for t in tasks:
        if t in TASKS:
            if t not in top:
                top.append(t)
        elif t in RULER_TASKS:
            if "ruler" not in top:
                top.append("ruler")
            ruler_sel.append(t)
        else:
            raise EvalInputError(f"unknown task {t!r}; known: {', '.join(TASKS)} "
                                 f"(or single RULER tasks: {', '.join(RULER_TASKS)})")
    ruler_tasks = ruler_sel if ruler_sel and "ruler" not in [t for t in tasks if t in TASKS] \
        else list(d["ruler"])
    kl_positions = d["kl_positions"] if kl_positions is None else kl_positions
    if isinstance(kl_positions, bool) or not isinstance(kl_positions, int) or kl_positions < 1:
        raise EvalInputError(f"kl positions must be a positive int, got {kl_positions!r}")
    if quick:
        ruler_lengths = kl_lengths = [max(lengths)]
    else:
        ruler_lengths = kl_lengths = list(lengths)
    if "kl" in top and kl_positions >= min(kl_lengths) // 2:
        raise EvalInputError(f"kl positions ({kl_positions}) must be < half the shortest KL length "
                             f"({min(kl_lengths)})")
    if threads is None:
        threads = os.cpu_count() or 1
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise EvalInputError(f"threads must be a positive int, got {threads!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise EvalInputError(f"seed must be a non-negative int, got {seed!r}")
    n_ubatch = 512 if n_ubatch is None else n_ubatch
    if isinstance(n_ubatch, bool) or not isinstance(n_ubatch, int) or not 1 <= n_ubatch <= 65536:
        raise EvalInputError(f"n_ubatch must be an int in [1, 65536], got {n_ubatch!r}")

    path = _resolve_model(model)
    # TCA switches: the same checks as Llama, before anything runs
    from .gguf_meta import read_budgets
    try:
        budgets = read_budgets(path)
    except Exception as e:
        raise EvalInputError(f"{path}: cannot read its TCA metadata: {e}") from e
    if tca_density is None and budgets is None:
        raise EvalInputError(
            f"{path} has no TCA calibration (tca.* metadata): calibrate it (`tca-ggml calibrate`) or "
            f"pass --tca-density X for a forced uniform budget (reported as uncalibrated)")
    if tca_density is None and tca_block is not None and tca_block != budgets.block_size:
        raise EvalInputError(f"--tca-block {tca_block} differs from the calibrated block size "
                             f"{budgets.block_size}; drop it, or use --tca-density")
    if quick:  # small window/block so that TCA evicts at the quick lengths
        if tca_density is not None:
            if tca_block is None:
                tca_block = QUICK["block"]
            if tca_window is None:
                tca_window = max(QUICK["window"], tca_block)
        elif tca_window is None:
            b = budgets.block_size
            tca_window = -(-QUICK["window"] // b) * b
    try:
        Llama._tca_config(True, tca_density, tca_block, tca_window, None)
    except (TypeError, ValueError) as e:
        raise EvalInputError(str(e).replace("tca_", "--tca-")) from e
    if tca_window is not None:
        blk = tca_block or (budgets.block_size if budgets else 128)
        if tca_window % blk:
            raise EvalInputError(f"--tca-window {tca_window} must be a multiple of the block size {blk}")

    # lengths against the model's training context and n_ctx
    n_ctx_train = _n_ctx_train(path)
    margin = max(MAX_TOKENS.values())
    all_lengths = set(lengths) | (set(ruler_lengths) if "ruler" in top else set()) | \
        (set(kl_lengths) if "kl" in top else set())
    need = max(all_lengths) + margin
    if n_ctx is None:
        n_ctx = -(-need // 256) * 256
        if n_ctx_train > 0:
            n_ctx = min(n_ctx, n_ctx_train)
    elif isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 1:
        raise EvalInputError(f"n_ctx must be a positive int, got {n_ctx!r}")
    if n_ctx_train > 0 and n_ctx > n_ctx_train:
        raise EvalInputError(f"n_ctx {n_ctx} exceeds the model's training context ({n_ctx_train} tokens)")
    for L in sorted(all_lengths):
        if n_ctx_train > 0 and L + margin > n_ctx_train:
            raise EvalInputError(f"length {L} (+{margin} answer tokens) exceeds the model's training "
                                 f"context ({n_ctx_train} tokens)")
        if L + margin > n_ctx:
            raise EvalInputError(f"length {L} (+{margin} answer tokens) does not fit in n_ctx {n_ctx}")
    return EvalConfig(model=path, quick=quick, lengths=lengths, depths=depths, tasks=top, needles=needles,
                      ruler_tasks=ruler_tasks if "ruler" in top else [],
                      ruler_lengths=ruler_lengths if "ruler" in top else [],
                      kl_lengths=kl_lengths if "kl" in top else [], kl_positions=kl_positions,
                      tca_density=None if tca_density is None else float(tca_density),
                      tca_window=tca_window, tca_block=tca_block, seed=seed, threads=threads,
                      flash_attn=bool(flash_attn), n_ctx=n_ctx, n_ctx_train=n_ctx_train, n_ubatch=n_ubatch)


# ------------------------------------------------------------------------------ prompts
@dataclass
class Job:
    task: str                       # 'niah', a RULER task, or 'kl'
    length: int                     # target prompt length (tokens)
    params: Dict[str, Any]
    content: Optional[str] = None   # user message (niah / ruler)
    tokens: Optional[List[int]] = None  # kl: the text's tokens
    expected: List[str] = field(default_factory=list)
    max_tokens: int = 0
    n_prompt: int = 0


class _Builder:
    """Builds prompts of a given token length with a vocab-only model."""

    def __init__(self, tok, seed: int):
        from . import texts
        self.tok = tok
        self.seed = seed
        self.hay = texts.haystack(400_000)
        # sentence ends (offsets just after the whitespace following . ! ?): the essays have no
        # blank-line paragraphs inside an essay, so texts.plant's paragraph boundaries would
        # only be essay boundaries (every short haystack would get its needle at depth 0)
        self.bounds = [m.end() for m in re.finditer(r"[.!?][\"')\]]*\s+", self.hay)]
        self._words = None
        self._add_bos = bool(tok._L.llama_vocab_get_add_bos(tok._vocab))

    def rng(self, *key) -> random.Random:
        return random.Random(":".join(str(k) for k in (self.seed,) + key))

    def cut(self, n_chars: int) -> str:
        """The first ~n_chars of texts.haystack, cut at a sentence end."""
        i = bisect.bisect_right(self.bounds, n_chars)
        c = self.bounds[i - 1] if i else 0
        return self.hay[:c].rstrip()

    @staticmethod
    def plant(text: str, needle: str, depth: float) -> str:
        """Insert the needle as its own sentence at relative depth (at the sentence end before
        it; depth 0 = first, 1 = last sentence of the haystack)."""
        if not 0.0 <= depth <= 1.0:
            raise EvalInputError("depth must be in [0, 1]")
        pos = int(len(text) * depth)
        if pos >= len(text):
            return text.rstrip() + " " + needle
        e = 0
        for m in re.finditer(r"[.!?][\"')\]]*\s+", text[:pos + 1]):
            e = m.end()
        return text[:e] + needle + " " + text[e:]

    def chat_tokens(self, content: str) -> List[int]:
        """The tokens create_chat_completion will evaluate for one user message."""
        tok = self.tok
        prompt = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        toks = tok.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
        bos = tok.token_bos()
        if self._add_bos and (not toks or toks[0] != bos):
            toks = [bos] + toks
        return toks

    def fit(self, make: Callable[[int], str], target: int, hi: int, what: str):
        """Largest u in [0, hi] whose prompt make(u) has <= target tokens; (content, n_tokens)."""
        n0 = len(self.chat_tokens(make(0)))
        if n0 > target:
            raise EvalInputError(f"{what}: even an empty filler needs {n0} tokens > length {target}")
        a, b = 0, hi
        while a < b:
            m = (a + b + 1) // 2
            if len(self.chat_tokens(make(m))) <= target:
                a = m
            else:
                b = m - 1
        content = make(a)
        return content, len(self.chat_tokens(content))

    def words(self) -> List[str]:
        if self._words is None:
            ws = sorted(set(re.findall(r"\b[a-z]{4,10}\b", self.hay[:200_000])))
            self._words = ws
        return self._words

    # ---- NIAH
    def niah(self, length: int, depth: float, kind: str) -> Job:
        r = self.rng("niah", length, depth, kind)
        if kind == "number":
            value = str(r.randint(1_000_000, 9_999_999))
            needle = f"The special magic number is {value}."
            question = "What is the special magic number mentioned in the text above? Answer with the number only."
        elif kind == "key":
            hexd = lambda n: "".join(r.choice("0123456789abcdef") for _ in range(n))
            value = f"{hexd(8)}-{hexd(4)}-{hexd(4)}"
            needle = f"The access key for the archive is {value}."
            question = "What is the access key for the archive mentioned in the text above? Answer with the key only."
        else:
            city, act, value = r.choice(_FACTS)
            needle = f"The best thing to do in {city} is to {act}."
            question = f"According to the text above, what is the best thing to do in {city}? Answer in one sentence."

        def make(n):
            return f"{self.plant(self.cut(n), needle, depth)}\n\n{question}"
        content, n = self.fit(make, length, 8 * length, f"niah length {length}")
        return Job("niah", length, {"depth": depth, "kind": kind}, content=content, expected=[value],
                   max_tokens=MAX_TOKENS["niah"], n_prompt=n)

    # ---- RULER-style
    def _key(self, r) -> str:
        w = self.words()
        return f"{r.choice(w)}-{r.choice(w)}"

    def _plant_many(self, text: str, needles: Sequence[str], depths: Sequence[float]) -> str:
        for nd, d in sorted(zip(needles, depths), key=lambda x: -x[1]):  # deepest first: positions stay valid
            text = self.plant(text, nd, d)
        return text

    def ruler(self, task: str, length: int) -> Job:
        r = self.rng("ruler", task, length)
        num = lambda: str(r.randint(1_000_000, 9_999_999))
        mt = MAX_TOKENS[task]
        if task in ("niah_single", "niah_multikey", "niah_multivalue"):
            if task == "niah_single":
                key, vals = self._key(r), [num()]
                needles = [f"One of the special magic numbers for {key} is: {vals[0]}."]
                expected = vals
                q = (f"What is the special magic number for {key} mentioned in the provided text? "
                     f"Answer with the number only.")
            elif task == "niah_multikey":
                keys = []
                while len(keys) < 4:
                    k = self._key(r)
                    if k not in keys:
                        keys.append(k)
                vals = [num() for _ in keys]
                needles = [f"One of the special magic numbers for {k} is: {v}." for k, v in zip(keys, vals)]
                i = r.randrange(len(keys))
                expected = [vals[i]]
                q = (f"What is the special magic number for {keys[i]} mentioned in the provided text? "
                     f"Answer with the number only.")
            else:
                key, vals = self._key(r), [num() for _ in range(4)]
                needles = [f"One of the special magic numbers for {key} is: {v}." for v in vals]
                expected = vals
                q = (f"What are all the special magic numbers for {key} mentioned in the provided text? "
                     f"List all of them, separated by commas.")
            depths = [r.uniform(0.05, 0.95) for _ in needles]

            def make(n):
                return (f"Some special magic numbers are hidden within the following text. Make sure to "
                        f"memorize them. I will quiz you about the numbers afterwards.\n\n"
                        f"{self._plant_many(self.cut(n), needles, depths)}\n\n{q}")
            content, n = self.fit(make, length, 8 * length, f"{task} length {length}")
            return Job(task, length, {"depths": depths}, content=content, expected=expected, max_tokens=mt,
                       n_prompt=n)
        if task == "vt":
            letters = string.ascii_uppercase
            names = []
            while len(names) < 10:
                v = "".join(r.choice(letters) for _ in range(5))
                if v not in names:
                    names.append(v)
            value, other = num(), num()
            chain, dist = names[:5], names[5:]
            stmts = [f"VAR {chain[0]} = {value}"] + [f"VAR {chain[i]} = VAR {chain[i - 1]}" for i in range(1, 5)]
            dstmts = [f"VAR {dist[0]} = {other}"] + [f"VAR {dist[i]} = VAR {dist[i - 1]}" for i in range(1, 5)]
            # each chain's statements in order, at random depths, the two chains interleaved
            ca = sorted(r.uniform(0.02, 0.98) for _ in range(5))
            da = sorted(r.uniform(0.02, 0.98) for _ in range(5))
            placed = sorted(list(zip(ca, stmts)) + list(zip(da, dstmts)))
            q = (f"Find all variables that are assigned the value {value} in the text above, directly or "
                 f"through other variables. Answer with the variable names, separated by commas.")

            def make(n):
                out, j = [], 0
                for i in range(n + 1):
                    while j < len(placed) and placed[j][0] * n <= i:
                        out.append(placed[j][1] + ".")
                        j += 1
                    if i < n:
                        out.append(_VT_NOISE)
                return ("Memorize and track the chain(s) of variable assignment hidden in the following "
                        "text.\n\n" + "\n".join(out) + f"\n\n{q}")
            content, n = self.fit(make, length, length, f"vt length {length}")
            return Job("vt", length, {"value": value}, content=content, expected=chain, max_tokens=mt,
                       n_prompt=n)
        if task == "cwe":
            ws = self.words()
            pool = r.sample(ws, min(len(ws), 4000))
            n_common = 5
            common, rare_pool = pool[:n_common], pool[n_common:]
            est_entries = max(40, int(length / 5))
            f_common = max(6, int(0.35 * est_entries / n_common))
            q = (f"Above is a numbered list of words. What are the {n_common} most common words in the "
                 f"list? Answer with the {n_common} words, separated by commas.")

            def make(n):
                rr = random.Random(f"{self.seed}:cwe-list:{length}:{n}")
                items = [w for w in common for _ in range(f_common)] + \
                        [w for w in rare_pool[:n] for _ in range(2)]
                rr.shuffle(items)
                lst = " ".join(f"{i + 1}. {w}" for i, w in enumerate(items))
                return f"Below is a numbered list of words.\n\n{lst}\n\n{q}"
            content, n = self.fit(make, length, len(rare_pool), f"cwe length {length}")
            return Job("cwe", length, {"n_common": n_common, "freq_common": f_common, "freq_rare": 2},
                       content=content, expected=common, max_tokens=mt, n_prompt=n)
        raise EvalInputError(f"unknown RULER task {task!r}")

    # ---- KL text
    def kl(self, length: int, positions: int) -> Job:
        # natural text, starting away from the NIAH haystack's beginning
        start = self.hay.find("\n\n", 150_000) + 2
        text = self.hay[start:start + 8 * length]
        toks = self.tok.tokenize(text.encode("utf-8"), add_bos=True, special=False)
        if len(toks) < length:
            raise EvalInputError(f"kl length {length}: not enough text")
        return Job("kl", length, {"positions": positions}, tokens=toks[:length], n_prompt=length)


def build_jobs(cfg: EvalConfig, log=None) -> List[Job]:
    from .llama import Llama
    jobs: List[Job] = []
    with Llama(cfg.model, vocab_only=True, verbose=False) as tok:
        b = _Builder(tok, cfg.seed)
        if "niah" in cfg.tasks:
            for L in cfg.lengths:
                for dpt in cfg.depths:
                    for k in cfg.needles:
                        jobs.append(b.niah(L, dpt, k))
        if "ruler" in cfg.tasks:
            for L in cfg.ruler_lengths:
                for t in cfg.ruler_tasks:
                    jobs.append(b.ruler(t, L))
        if "kl" in cfg.tasks:
            for L in cfg.kl_lengths:
                jobs.append(b.kl(L, cfg.kl_positions))
    return jobs


# ------------------------------------------------------------------------------ scoring
def _norm(s: str) -> str:
    s = s.lower().replace("\u2019", "'")
    s = re.sub(r"(?<=\d)[,\s](?=\d{3}\b)", "", s)   # 7,392,841 -> 7392841
    return re.sub(r"\s+", " ", s)


def score_answer(answer: str, expected: Sequence[str]) -> float:
    """Share of expected items found in the answer (case-insensitive, whole tokens)."""
    if not expected:
        return 0.0
    a = _norm(answer)
    hit = 0
    for e in expected:
        e = _norm(e)
        if re.search(r"(?<![0-9a-z])" + re.escape(e) + r"(?![0-9a-z])", a):
            hit += 1
    return hit / len(expected)


# ------------------------------------------------------------------------------ running
def decode_logits(llm, tokens: Sequence[int], positions: int) -> np.ndarray:
    """Logits [positions, n_vocab] predicting tokens[-positions:]: prefill tokens[:-positions],
    then decode the true tokens one by one (a cold cache first)."""
    n = len(tokens)
    p0 = n - positions
    llm.reset()
    llm.eval_prompt(list(tokens[:p0]))
    out = [llm._logits_last()]
    for i in range(p0, n - 1):
        llm._decode([int(tokens[i])], i)
        out.append(llm._logits_last())
    return np.stack(out)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def _tca_snapshot(llm) -> Dict[str, Any]:
    st = llm.tca_stats()
    if not st["active"]:
        return {"active": False}
    layer, cov, ret = st["layer"], st["coverage"].astype(np.float64), st["retained"].astype(np.float64)
    layers = sorted(set(int(x) for x in layer))
    H = max(len(ret), 1)
    n_seen = max(int(st["n_seen"]), 1)
    return {"active": True, "n_seen": int(st["n_seen"]), "n_compactions": int(st["n_compactions"]),
            "kept_share": float(ret.sum() / (H * n_seen)),
            "bytes_alloc": int(st["bytes_alloc"]), "bytes_dense": int(st["bytes_dense"]),
            "layers": layers,
            "cov_mean": [float(cov[layer == il].mean()) for il in layers],
            "cov_min": [float(cov[layer == il].min()) for il in layers]}


def _arm_kwargs(cfg: EvalConfig, arm: str) -> Dict[str, Any]:
    kw = dict(n_ctx=cfg.n_ctx, n_batch=max(cfg.n_ubatch, 512), n_ubatch=cfg.n_ubatch, n_threads=cfg.threads,
              n_threads_batch=cfg.threads, seed=cfg.seed, verbose=False)
    if arm == "dense":
        kw["flash_attn"] = cfg.flash_attn
    else:
        kw.update(tca=True, tca_density=cfg.tca_density, tca_window=cfg.tca_window, tca_block=cfg.tca_block)
    return kw


def _describe(job: Job) -> str:
    p = job.params
    if job.task == "niah":
        return f"niah L={job.length} depth={p['depth']:g} {p['kind']}"
    return f"{job.task} L={job.length}"


def run_arm(cfg: EvalConfig, arm: str, jobs: Sequence[Job], log=None) -> Dict[str, Any]:
    from .llama import Llama
    t0 = time.perf_counter()
    out: Dict[str, Any] = {"results": []}
    with Llama(cfg.model, **_arm_kwargs(cfg, arm)) as llm:
        tp = getattr(llm, "_tp", None)
        out["label"] = llm.tca_label
        if arm == "tca" and tp is not None:
            out["window"], out["block"], out["n_sink"] = int(tp.window), int(tp.block), int(tp.n_sink)
        for job in jobs:
            t1 = time.perf_counter()
            res: Dict[str, Any] = {}
            if job.task == "kl":
                res["logits"] = decode_logits(llm, job.tokens, job.params["positions"])
            else:
                llm.reset()  # cold cache: no prefix reuse between prompts
                r = llm.create_chat_completion([{"role": "user", "content": job.content}], temperature=0.0,
                                               max_tokens=job.max_tokens, seed=cfg.seed)
                ans = r["choices"][0]["message"]["content"]
                res.update(answer=ans, score=score_answer(ans, job.expected),
                           prompt_tokens=int(r["usage"]["prompt_tokens"]))
            if arm == "tca":
                res["tca"] = _tca_snapshot(llm)
            res["seconds"] = time.perf_counter() - t1
            out["results"].append(res)
            if log:
                extra = f"score {res['score']:.2f}" if "score" in res else f"{job.params['positions']} positions"
                kept = res.get("tca", {}).get("kept_share")
                kept = f", kept {kept:.2f}" if kept is not None else ""
                log(f"[{arm}] {_describe(job)}: {extra}{kept} ({res['seconds']:.1f} s)")
    out["seconds"] = time.perf_counter() - t0
    return out


def run_eval(cfg: EvalConfig, log: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """Both arms on the same jobs; returns the JSON-able result (see `to_markdown`)."""
    t0 = time.perf_counter()
    jobs = build_jobs(cfg, log)
    if log:
        log(f"{len(jobs)} prompts per arm, n_ctx {cfg.n_ctx}, {cfg.threads} threads")
    dense = run_arm(cfg, "dense", jobs, log)
    tca = run_arm(cfg, "tca", jobs, log)
    res = _assemble(cfg, jobs, dense, tca)
    res["seconds_total"] = time.perf_counter() - t0
    return res


# ------------------------------------------------------------------------------ results
def _mean(xs) -> Optional[float]:
    xs = list(xs)
    return float(np.mean(xs)) if xs else None


def _assemble(cfg: EvalConfig, jobs, dense, tca) -> Dict[str, Any]:
    tca_label = tca["label"]
    w, b = tca.get("window"), tca.get("block")
    cfgd = asdict(cfg)
    res: Dict[str, Any] = {
        "model": os.path.basename(cfg.model), "model_path": cfg.model, "config": cfgd,
        "arms": {"dense": {"label": dense["label"] + (", flash attention" if cfg.flash_attn else ""),
                           "seconds": dense["seconds"]},
                 "tca": {"label": tca_label, "window": w, "block": b, "n_sink": tca.get("n_sink"),
                         "uncalibrated": cfg.tca_density is not None, "seconds": tca["seconds"]}},
        "niah": [], "ruler": [], "kl": [], "coverage": {},
    }
    snaps = []
    for job, rd, rt in zip(jobs, dense["results"], tca["results"]):
        snap = rt.get("tca", {"active": False})
        snaps.append((job, snap))
        kept = snap.get("kept_share") if snap.get("active") else None
        if job.task == "kl":
            ld, lt = _log_softmax(rd["logits"]), _log_softmax(rt["logits"])
            pd = np.exp(ld)
            kl = (pd * (ld - lt)).sum(axis=-1)
            tgt = np.asarray(job.tokens[-job.params["positions"]:])
            idx = np.arange(len(tgt))
            nll_d, nll_t = -ld[idx, tgt], -lt[idx, tgt]
            res["kl"].append({
                "length": job.length, "positions": int(len(tgt)),
                "kl_mean": float(kl.mean()), "kl_max": float(kl.max()), "kl_median": float(np.median(kl)),
                "top1_agree": float((ld.argmax(-1) == lt.argmax(-1)).mean()),
                "ppl_dense": float(np.exp(nll_d.mean())), "ppl_tca": float(np.exp(nll_t.mean())),
                "kl_per_position": [float(x) for x in kl], "tca_kept": kept,
                "seconds": {"dense": rd["seconds"], "tca": rt["seconds"]}})
            continue
        row = {"task": job.task, "length": job.length, "prompt_tokens": rd["prompt_tokens"],
               "expected": list(job.expected),
               "dense": {"answer": rd["answer"], "score": rd["score"]},
               "tca": {"answer": rt["answer"], "score": rt["score"]},
               "delta": rt["score"] - rd["score"], "tca_kept": kept,
               "seconds": {"dense": rd["seconds"], "tca": rt["seconds"]}}
        if job.task == "niah":
            row.update(depth=job.params["depth"], kind=job.params["kind"])
            res["niah"].append(row)
        else:
            res["ruler"].append(row)

    # coverage per layer over the TCA runs that compacted
    runs = [{"task": j.task, "length": j.length, **s} for j, s in snaps if s.get("active")]
    comp = [s for s in runs if s.get("n_compactions", 0) > 0]
    per_layer = []
    if comp:
        layers = comp[0]["layers"]
        for i, il in enumerate(layers):
            per_layer.append({"layer": il, "mean": float(np.mean([s["cov_mean"][i] for s in comp])),
                              "min": float(np.min([s["cov_min"][i] for s in comp]))})
    res["coverage"] = {"runs": runs, "n_runs_compacted": len(comp), "per_layer": per_layer,
                       "kept_share_mean": _mean(s["kept_share"] for s in runs),
                       "bytes_ratio_mean": _mean(s["bytes_alloc"] / s["bytes_dense"] for s in runs
                                                 if s["bytes_dense"])}
    nd = [r["dense"]["score"] for r in res["niah"]]
    nt = [r["tca"]["score"] for r in res["niah"]]
    rd_ = [r["dense"]["score"] for r in res["ruler"]]
    rt_ = [r["tca"]["score"] for r in res["ruler"]]
    res["summary"] = {
        "niah_dense": _mean(nd), "niah_tca": _mean(nt),
        "ruler_dense": _mean(rd_), "ruler_tca": _mean(rt_),
        "kl_mean": _mean(k["kl_mean"] for k in res["kl"]),
        "kl_max": max((k["kl_max"] for k in res["kl"]), default=None),
        "top1_agree": _mean(k["top1_agree"] for k in res["kl"]),
        "ppl_dense": _mean(k["ppl_dense"] for k in res["kl"]),
        "ppl_tca": _mean(k["ppl_tca"] for k in res["kl"]),
        "coverage_mean": _mean(p["mean"] for p in per_layer),
        "coverage_min": min((p["min"] for p in per_layer), default=None),
        "tca_kept_share": res["coverage"]["kept_share_mean"],
    }
    return res


def _f(x, fmt="{:.2f}") -> str:
    return "–" if x is None else fmt.format(x)


def to_markdown(res: Dict[str, Any]) -> str:
    c, a, s = res["config"], res["arms"], res["summary"]
    t = a["tca"]
    wb = f", w={t['window']}, b={t['block']}" if t.get("window") is not None else ""
    out = [f"# TCA eval: {res['model']}", "",
           f"- dense: {a['dense']['label']} ({a['dense']['seconds']:.0f} s)",
           f"- TCA: {t['label']}{wb} ({t['seconds']:.0f} s)",
           f"- n_ctx {c['n_ctx']}, n_ubatch {c['n_ubatch']}, {c['threads']} threads, seed {c['seed']}, greedy"
           f"{', quick' if c['quick'] else ''}; total {res.get('seconds_total', 0):.0f} s",
           "- kept = TCA's retained KV rows / dense rows after the prompt (1.00 = nothing evicted)", ""]
    tl = f"TCA: {t['label']}"
    if res["niah"]:
        out += ["## Needle in a haystack (exact match of the needle value)", "",
                f"| length | depth | dense | {tl} | Δ | kept |", "|---:|---:|---:|---:|---:|---:|"]
        cells: Dict[tuple, list] = {}
        for r in res["niah"]:
            cells.setdefault((r["length"], r["depth"]), []).append(r)
        for (L, d), rs in sorted(cells.items()):
            md, mt = _mean(r["dense"]["score"] for r in rs), _mean(r["tca"]["score"] for r in rs)
            out.append(f"| {L} | {d:g} | {md:.2f} | {mt:.2f} | {mt - md:+.2f} | "
                       f"{_f(_mean(r['tca_kept'] for r in rs if r['tca_kept'] is not None))} |")
        out.append(f"| **all** | | **{s['niah_dense']:.2f}** | **{s['niah_tca']:.2f}** | "
                   f"**{s['niah_tca'] - s['niah_dense']:+.2f}** | |")
        kinds = sorted(set(r["kind"] for r in res["niah"]))
        if len(kinds) > 1:
            out += ["", "| needle | dense | TCA | Δ |", "|---|---:|---:|---:|"]
            for k in kinds:
                rs = [r for r in res["niah"] if r["kind"] == k]
                md, mt = _mean(r["dense"]["score"] for r in rs), _mean(r["tca"]["score"] for r in rs)
                out.append(f"| {k} | {md:.2f} | {mt:.2f} | {mt - md:+.2f} |")
        out.append("")
    if res["ruler"]:
        out += ["## RULER-style synthetic tasks (share of expected items in the answer)", "",
                f"| task | length | dense | {tl} | Δ (points) | kept |", "|---|---:|---:|---:|---:|---:|"]
        for r in res["ruler"]:
            out.append(f"| {r['task']} | {r['length']} | {r['dense']['score']:.2f} | {r['tca']['score']:.2f} | "
                       f"{100 * r['delta']:+.0f} | {_f(r['tca_kept'])} |")
        out.append(f"| **mean** | | **{s['ruler_dense']:.2f}** | **{s['ruler_tca']:.2f}** | "
                   f"**{100 * (s['ruler_tca'] - s['ruler_dense']):+.0f}** | |")
        out.append("")
    if res["kl"]:
        out += [f"## Logit fidelity on essays (last M positions, decoded token by token), {tl}", "",
                "| length | M | mean KL(dense‖TCA) | median KL | max KL | top-1 agree | ppl dense | ppl TCA | kept |",
                "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for k in res["kl"]:
            out.append(f"| {k['length']} | {k['positions']} | {k['kl_mean']:.2e} | {k['kl_median']:.2e} | "
                       f"{k['kl_max']:.2e} | {k['top1_agree']:.3f} | {k['ppl_dense']:.3f} | {k['ppl_tca']:.3f} | "
                       f"{_f(k['tca_kept'])} |")
        out.append("")
    cov = res["coverage"]
    if cov.get("per_layer"):
        pl = cov["per_layer"]
        out += [f"## Coverage of the last compaction's query, per layer ({cov['n_runs_compacted']} runs), {tl}", "",
                "| layer | " + " | ".join(str(p["layer"]) for p in pl) + " |",
                "|---|" + "---:|" * len(pl),
                "| mean | " + " | ".join(f"{p['mean']:.3f}" for p in pl) + " |",
                "| min | " + " | ".join(f"{p['min']:.3f}" for p in pl) + " |", "",
                f"mean kept share of KV rows {_f(cov['kept_share_mean'], '{:.3f}')}, "
                f"KV bytes allocated / dense {_f(cov['bytes_ratio_mean'], '{:.3f}')}", ""]
    elif not cov.get("runs"):
        out += ["TCA was not active in any run (n_ctx <= window + block: the TCA arm is dense).", ""]
    else:
        out += ["TCA never compacted (every prompt fits in window + block): no coverage to report.", ""]
    return "\n".join(out)


def write_json(res: Dict[str, Any], path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(res, f, indent=1, ensure_ascii=False)
        f.write("\n")


def write_plots(res: Dict[str, Any], plot_dir: str) -> List[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(plot_dir, exist_ok=True)
    written = []
    t = res["arms"]["tca"]
    tl = f"TCA: {t['label']}" + (f", w={t['window']}, b={t['block']}" if t.get("window") else "")
    if res["niah"]:
        Ls = sorted(set(r["length"] for r in res["niah"]))
        Ds = sorted(set(r["depth"] for r in res["niah"]))
        grids = {}
        for arm in ("dense", "tca"):
            g = np.zeros((len(Ds), len(Ls)))
            for i, d in enumerate(Ds):
                for j, L in enumerate(Ls):
                    g[i, j] = np.mean([r[arm]["score"] for r in res["niah"] if r["depth"] == d and r["length"] == L])
            grids[arm] = g
        grids["diff"] = grids["tca"] - grids["dense"]
        titles = {"dense": f"dense: {res['arms']['dense']['label']}", "tca": tl, "diff": "TCA − dense"}
        for name, g in grids.items():
            fig, ax = plt.subplots(figsize=(1.6 + 1.0 * len(Ls), 1.4 + 0.45 * len(Ds)))
            if name == "diff":
                im = ax.imshow(g, cmap="RdBu", vmin=-1, vmax=1, aspect="auto")
            else:
                im = ax.imshow(g, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
            for i in range(len(Ds)):
                for j in range(len(Ls)):
                    ax.text(j, i, f"{g[i, j]:.2f}", ha="center", va="center", fontsize=8)
            ax.set_xticks(range(len(Ls)), [str(L) for L in Ls])
            ax.set_yticks(range(len(Ds)), [f"{d:g}" for d in Ds])
            ax.set_xlabel("prompt length (tokens)")
            ax.set_ylabel("needle depth")
            ax.set_title(f"NIAH {titles[name]}\n{res['model']}", fontsize=8)
            fig.colorbar(im, ax=ax)
            fig.tight_layout()
            p = os.path.join(plot_dir, f"niah_{name}.png")
            fig.savefig(p, dpi=120)
            plt.close(fig)
            written.append(p)
    if res["kl"]:
        fig, ax = plt.subplots(figsize=(6, 3))
        for k in res["kl"]:
            ax.semilogy(range(k["length"] - k["positions"], k["length"]),
                        np.maximum(k["kl_per_position"], 1e-12), ".-", label=f"L={k['length']}")
        ax.set_xlabel("position")
        ax.set_ylabel("KL(dense‖TCA)")
        ax.set_title(tl, fontsize=8)
        ax.legend(fontsize=7)
        fig.tight_layout()
        p = os.path.join(plot_dir, "kl.png")
        fig.savefig(p, dpi=120)
        plt.close(fig)
        written.append(p)
    pl = res["coverage"].get("per_layer")
    if pl:
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.plot([p["layer"] for p in pl], [p["mean"] for p in pl], "o-", label="mean")
        ax.plot([p["layer"] for p in pl], [p["min"] for p in pl], "v--", label="min")
        ax.set_xlabel("layer")
        ax.set_ylabel("coverage")
        ax.set_ylim(0, 1.02)
        ax.set_title(tl, fontsize=8)
        ax.legend(fontsize=7)
        fig.tight_layout()
        p = os.path.join(plot_dir, "coverage.png")
        fig.savefig(p, dpi=120)
        plt.close(fig)
        written.append(p)
    return written


# ------------------------------------------------------------------------------ CLI glue
def _ints(s: str, what: str) -> List[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise EvalInputError(f"--{what} must be comma-separated integers, got {s!r}") from None


def _floats(s: str, what: str) -> List[float]:
    try:
        return [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise EvalInputError(f"--{what} must be comma-separated numbers, got {s!r}") from None


def _names(s: str) -> List[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def run_from_args(a) -> int:
    """`tca-ggml eval`: validate, run, print markdown, write --json/--md/--plot-dir."""
    if a.plot_dir:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise EvalInputError("--plot-dir needs matplotlib (pip install matplotlib)") from None
    for opt in ("json", "md"):
        p = getattr(a, opt)
        if p and os.path.dirname(os.path.abspath(p)) and not os.path.isdir(os.path.dirname(os.path.abspath(p))):
            raise EvalInputError(f"--{opt}: directory of {p} does not exist")
    cfg = make_config(
        a.model, quick=a.quick,
        lengths=_ints(a.lengths, "lengths") if a.lengths else None,
        depths=_floats(a.depths, "depths") if a.depths else None,
        tasks=_names(a.tasks) if a.tasks else None,
        needles=_names(a.needles) if a.needles else None,
        kl_positions=a.kl_positions, tca_density=a.tca_density, tca_window=a.tca_window,
        tca_block=a.tca_block, seed=a.seed, threads=a.threads, flash_attn=a.flash_attn, n_ctx=a.n_ctx,
        n_ubatch=a.n_ubatch)
    log = lambda m: print(m, file=sys.stderr, flush=True)
    res = run_eval(cfg, log=log)
    md = to_markdown(res)
    print(md)
    if a.md:
        with open(a.md, "w", encoding="utf-8") as f:
            f.write(md + "\n")
        log(f"wrote {a.md}")
    if a.json:
        write_json(res, a.json)
        log(f"wrote {a.json}")
    if a.plot_dir:
        for p in write_plots(res, a.plot_dir):
            log(f"wrote {p}")
    return 0
