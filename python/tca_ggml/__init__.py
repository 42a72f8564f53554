"""tca_ggml — TCA-Attention for llama.cpp.

`tca_ggml.Llama` is a drop-in for `llama_cpp.Llama` (change one import); `tca=True`
turns on per-head selective KV retention with budgets calibrated into the GGUF.
"""
from .errors import (TCAError, NativeLibraryError, ModelLoadError, ContextError, DecodeError,
                     ContextOverflowError, TCAConfigError, TokenizeError, RPCError)

__version__ = "0.1.0"

__all__ = ["Llama", "LlamaState", "TCAError", "NativeLibraryError", "ModelLoadError", "ContextError", "DecodeError",
           "ContextOverflowError", "TCAConfigError", "TokenizeError", "RPCError", "__version__"]


def __getattr__(name):
    # Lazy: importing tca_ggml (e.g. for the NumPy reference or the GGUF tools) must not
    # need the native library.
    if name == "Llama":
        from .llama import Llama
        return Llama
    if name == "LlamaState":
        from .llama import LlamaState
        return LlamaState
    raise AttributeError(name)
