"""File-system helpers shared by the writers of the package (evalkit's cache, random_model)."""
from __future__ import annotations

import os
import stat
from contextlib import contextmanager
from typing import Iterator, Union

PathLike = Union[str, "os.PathLike[str]"]


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def check_output_path(path: PathLike) -> None:
    """Refuse an output path that exists and is not a regular file (following symbolic links):
    a writer replaces its output by renaming a temp file over it, which would turn a device
    (``/dev/null``), a FIFO or a socket into a regular file. Raises ``OutputPathError``."""
    from .errors import OutputPathError
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise OutputPathError(f"{path} is a dangling symbolic link: refusing to replace it") from None
        return
    except OSError as e:
        raise OutputPathError(f"{path}: cannot stat the output path: {e}") from e
    if not stat.S_ISREG(st.st_mode):
        raise OutputPathError(f"{path} exists and is {_kind(st.st_mode)}, not a regular file: refusing to replace it")


def check_input_file(path: PathLike) -> os.stat_result:
    """The stat of an input file that must be a regular file (a FIFO would block the reader
    forever; a directory or a device is never a model). Raises ``FileNotFoundError`` when it is
    missing, ``ModelLoadError`` when it is not a regular file."""
    from .errors import ModelLoadError
    path = os.fspath(path)
    st = os.stat(path)  # FileNotFoundError goes on
    if not stat.S_ISREG(st.st_mode):
        raise ModelLoadError(f"{path} is {_kind(st.st_mode)}, not a regular file (a model must be a .gguf file)")
    return st


@contextmanager
def replace_when_done(tmp: PathLike, path: PathLike) -> Iterator[None]:
    """The body writes `tmp`; at its end `tmp` is renamed to `path` (atomically), and on any
    exception (KeyboardInterrupt too) `tmp` is removed and the exception goes on. `path` must not
    exist or be a regular file (``check_output_path``), checked before the body runs."""
    check_output_path(path)
    try:
        yield
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
