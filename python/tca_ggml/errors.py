"""One exception hierarchy for everything that can go wrong in tca_ggml.

Every error from the native layer is mapped here (pygit2 style): callers catch
``TCAError`` or a specific subclass; none of these is ever a crash.
"""


class TCAError(Exception):
    """Base class of all tca_ggml errors."""


class NativeLibraryError(TCAError, OSError):
    """The native library is missing, cannot be loaded, or its ABI does not match."""


class ModelLoadError(TCAError, ValueError):
    """A model file is missing, not GGUF, truncated, or rejected by the loader."""


class ContextError(TCAError, RuntimeError):
    """A context could not be created (bad parameters, out of memory)."""


class DecodeError(TCAError, RuntimeError):
    """llama_decode failed."""


class ContextOverflowError(TCAError, ValueError):
    """The prompt (plus requested tokens) does not fit in the context."""


class TCAConfigError(TCAError, ValueError):
    """TCA was asked for but the model/metadata/parameters do not allow it."""


class TokenizeError(TCAError, ValueError):
    """Tokenization or detokenization failed."""


class OutputPathError(TCAError, ValueError):
    """An output path that must not be written: it exists and is not a regular file (a device such
    as /dev/null, a FIFO, a directory, a socket). Writers only ever replace regular files."""


class RPCError(TCAError, ConnectionError):
    """An rpc-server of ``Llama(rpc_servers=...)`` could not be reached at load (refused, timed out,
    another protocol version), or its connection was lost mid-session (the server was killed, the host
    vanished): the Llama that used it cannot go on (its layers' state was there); close it and load
    again once the server is back."""
