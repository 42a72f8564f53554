"""cffi (ABI mode) bindings to libtca_ggml, and how the package calls into it.

Declarations (none retyped here; pygit2's ``decl/`` is the model):
- ``decl/llama.h``: the subset of upstream's llama.h the package uses, trimmed by hand; its struct
  layouts are checked at import against the library's own ``sizeof``/``offsetof``
  (``tca_abi_layout``), so a mismatched declaration fails loudly instead of corrupting memory.
- ``tca_ggml.h``: the project's own C API, read as it is from the header the library was built
  with: ``decl/tca_ggml.h`` (installed beside the library) or, in a source checkout,
  ``native/include/tca_ggml.h``. ``cdef_from_header`` makes any of our headers cffi's (comments,
  preprocessor lines and the export macro removed); the tests load their test library's header
  (native/tests/tca_test_ops.h) the same way (``open_library``).

Errors and callbacks (pygit2's way): a ``Scope`` is what one owner -- a ``Llama`` -- sees of the
native layer: upstream's log lines are routed to the scope active on the calling thread (so one
instance's ``verbose`` never affects another's), the error lines of its last call are kept for the
exception message, and an exception raised by a Python callback during a C call (progress, eval) is
stored and re-raised by ``Scope.check`` once the call has returned. ``check`` is the one place that
turns a failed native call into a ``TCAError``.
"""
from __future__ import annotations

import os
import re
import sys
import threading
from pathlib import Path
from typing import Callable, Optional, Type

import cffi

from .errors import NativeLibraryError

LIB_NAME = "libtca_ggml.so"
HEADER_NAME = "tca_ggml.h"
_PKG = Path(__file__).resolve().parent
DECL_DIR = _PKG / "decl"

GGML_LOG_LEVEL_WARN = 3
GGML_LOG_LEVEL_ERROR = 4
GGML_LOG_LEVEL_CONT = 5


# ------------------------------------------------------------------ declarations
_ATTR_MACRO = re.compile(r"^[ \t]*#[ \t]*define[ \t]+(\w+)[ \t]+__attribute__[ \t]*\(\(.*\)\)[ \t]*$", re.M)
_INT_DEFINE = re.compile(r"#\s*define\s+\w+\s+\(?-?(?:0[xX][0-9a-fA-F]+|\d+)[uUlL]*\)?$")
_CPLUSPLUS_IF = re.compile(r"#\s*if(?:def\s+__cplusplus\b|\s+defined\s*\(?\s*__cplusplus\b)")


def cdef_from_header(text: str) -> str:
    """The cffi declarations of one of our C headers, as written: comments, preprocessor lines,
    ``#ifdef __cplusplus`` blocks and attribute-only macros (``TCA_API``) removed; integer
    ``#define``s kept (cffi reads those). Line numbers stay the header's (for cffi's errors)."""
    macros = _ATTR_MACRO.findall(text)
    text = re.sub(r"/\*.*?\*/", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S)
    text = re.sub(r"//[^\n]*", "", text)
    out, depth = [], 0  # depth > 0: inside an #if __cplusplus block
    for line in text.split("\n"):
        s = line.strip()
        keep = ""
        if not s.startswith("#"):
            keep = line if depth == 0 else ""
        elif depth:
            if re.match(r"#\s*if", s):
                depth += 1
            elif re.match(r"#\s*endif", s):
                depth -= 1
        elif _CPLUSPLUS_IF.match(s):
            depth = 1
        elif _INT_DEFINE.match(s):
            keep = s
        out.append(keep)
    text = "\n".join(out)
    for m in macros:
        text = re.sub(rf"\b{m}\b", "", text)
    return text


def header_path() -> Path:
    """tca_ggml.h as installed beside the library, else the source checkout's."""
    for p in (DECL_DIR / HEADER_NAME, _PKG.parent.parent / "native" / "include" / HEADER_NAME):
        if p.is_file():
            return p
    raise NativeLibraryError(f"{HEADER_NAME} not found in {DECL_DIR} (installed with the library by "
                             f"`pip install .`) nor in a source checkout")


def _read(p: Path) -> str:
    return p.read_text(encoding="utf-8")


ffi = cffi.FFI()
ffi.cdef(_read(DECL_DIR / "llama.h"))
ffi.cdef(cdef_from_header(_read(header_path())))


def open_library(path, header) -> tuple:
    """(ffi, lib) of another library of ours declared by `header` (e.g. the tests' test library):
    its own FFI, declarations read from the header as with tca_ggml.h."""
    path = Path(path)
    if not path.exists():
        raise NativeLibraryError(f"{path} not found")
    f = cffi.FFI()
    f.cdef(cdef_from_header(_read(Path(header))))
    try:
        return f, f.dlopen(str(path))
    except OSError as e:
        raise NativeLibraryError(f"cannot load {path}: {e}") from e


# ------------------------------------------------------------------ errors, callbacks, logs
_tls = threading.local()


class Scope:
    """What one owner sees of the native layer (pygit2's ``Payload``).

    ``with scope:`` routes upstream's log lines emitted on this thread to the scope: printed when
    ``verbose``, error lines kept for the next exception. ``callback()`` wraps a Python function as
    a C callback whose exceptions are stored instead of crossing into C; ``check()`` re-raises the
    stored exception after the C call returns, or maps a failed call to a ``TCAError``."""

    def __init__(self, verbose: bool = False):
        self.verbose = bool(verbose)
        self._errors: list = []
        self._in_error = False
        self._exc: Optional[BaseException] = None

    def __enter__(self) -> "Scope":
        stack = getattr(_tls, "stack", None)
        if stack is None:
            stack = _tls.stack = []
        stack.append(self)
        self._errors.clear()
        self._in_error = False
        return self

    def __exit__(self, *exc) -> bool:
        _tls.stack.pop()
        return False

    def call(self, fn, *args):
        """fn(*args) with this scope active."""
        with self:
            return fn(*args)

    def _log(self, level: int, msg: str) -> None:
        if level == GGML_LOG_LEVEL_ERROR or (level == GGML_LOG_LEVEL_CONT and self._in_error):
            self._errors.append(msg)
            del self._errors[:-50]
            self._in_error = True
        else:
            self._in_error = False
        if self.verbose:
            sys.stderr.write(msg)

    def callback(self, ctype: str, fn: Callable, error):
        """fn as a C callback of type `ctype`; if it raises, the exception is stored (the first
        one) and `error` is returned to C (for upstream's callbacks: stop/abort)."""
        return ffi.callback(ctype, fn, error=error, onerror=self._store)

    def _store(self, exc_type, exc, tb) -> None:
        if self._exc is None:
            self._exc = exc if exc is not None else exc_type()
        return None

    @property
    def pending(self) -> bool:
        """A callback raised during the last call (check() will re-raise it)."""
        return self._exc is not None

    def take_errors(self) -> str:
        msg = "".join(self._errors).strip()
        self._errors.clear()
        return msg

    def check(self, ok, exc_type: Type[Exception], what: str, reason: str = "",
              default: str = "see the log with verbose=True") -> None:
        """After a native call: re-raise what a callback raised during it; otherwise, if the call
        failed (`ok` false), raise ``exc_type("what: reason")`` -- the reason being the message
        the C function wrote (`reason`), else upstream's error lines, else `default`."""
        exc, self._exc = self._exc, None
        if exc is not None:
            self._errors.clear()
            raise exc
        if not ok:
            raise exc_type(f"{what}: {reason or self.take_errors() or default}")


_default_scope = Scope(verbose=False)  # log lines emitted outside any scope (other threads, no owner)


def check(ok, exc_type: Type[Exception], what: str, reason: str = "",
          default: str = "see the log with verbose=True", scope: Optional[Scope] = None) -> None:
    """``Scope.check`` for calls without an owner."""
    (scope or _default_scope).check(ok, exc_type, what, reason, default)


def err_text(buf) -> str:
    """A NUL-terminated message a C function wrote into `buf`."""
    return ffi.string(buf).decode("utf-8", "replace")


def _current_scope() -> Scope:
    stack = getattr(_tls, "stack", None)
    return stack[-1] if stack else _default_scope


def _log_onerror(exc_type, exc, tb) -> None:
    # a log line must never raise into C: keep the exception for the current scope's check()
    _current_scope()._store(exc_type, exc, tb)


@ffi.callback("void(int, const char *, void *)", onerror=_log_onerror)
def _log_cb(level, text, user_data):  # pragma: no cover - exercised through loads
    msg = ffi.string(text).decode("utf-8", "replace") if text != ffi.NULL else ""
    _current_scope()._log(level, msg)


# ------------------------------------------------------------------ the library
_lib = None
_lib_path: Optional[Path] = None
_lock = threading.Lock()


def library_path() -> Path:
    env = os.environ.get("TCA_GGML_LIB")
    if env:
        return Path(env)
    return _PKG / "lib" / LIB_NAME


def lib():
    global _lib, _lib_path
    if _lib is not None:
        return _lib
    with _lock:
        if _lib is not None:
            return _lib
        p = library_path()
        if not p.exists():
            raise NativeLibraryError(
                f"native library not found at {p}; build the package with `pip install .` "
                f"(or set TCA_GGML_LIB to a built libtca_ggml.so)")
        try:
            L = ffi.dlopen(str(p))
        except OSError as e:
            raise NativeLibraryError(f"cannot load {p}: {e}") from e
        _check_abi(L)
        L.llama_log_set(_log_cb, ffi.NULL)
        L.llama_backend_init()
        _lib, _lib_path = L, p
        return L


_ABI_CHECKS = [
    ("llama_model_params", None), ("llama_model_params", "n_gpu_layers"),
    ("llama_model_params", "progress_callback"), ("llama_model_params", "kv_overrides"),
    ("llama_model_params", "vocab_only"), ("llama_model_params", "load_mtp"),
    ("llama_context_params", None), ("llama_context_params", "n_threads_batch"),
    ("llama_context_params", "flash_attn_type"), ("llama_context_params", "cb_eval"),
    ("llama_context_params", "type_k"), ("llama_context_params", "type_v"),
    ("llama_context_params", "abort_callback"), ("llama_context_params", "kv_unified"),
    ("llama_context_params", "samplers"), ("llama_context_params", "ctx_other"),
    ("llama_batch", None), ("llama_batch", "logits"),
    ("llama_chat_message", None), ("llama_sampler_chain_params", None),
    # tca_ggml.h's structs: read from the header, so this catches a header that is not the one
    # the library was built with
    ("tca_config", None), ("tca_stats", None), ("tca_budgets", None), ("tca_rpc_stats", None),
]


def _check_abi(L) -> None:
    for struct, field in _ABI_CHECKS:
        want = L.tca_abi_layout(struct.encode(), field.encode() if field else ffi.NULL)
        ctype = f"struct {struct}"
        got = ffi.sizeof(ctype) if field is None else ffi.offsetof(ctype, field)
        if want != got:
            raise NativeLibraryError(
                f"ABI mismatch: {struct}{'.' + field if field else ''} is {want} in the library, "
                f"{got} in the Python declarations")
