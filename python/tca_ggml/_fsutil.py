"""File-system helpers shared by the writers of the package (evalkit's cache, random_model)."""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator, Union

PathLike = Union[str, "os.PathLike[str]"]


@contextmanager
def replace_when_done(tmp: PathLike, path: PathLike) -> Iterator[None]:
    """The body writes `tmp`; at its end `tmp` is renamed to `path` (atomically), and on any
    exception (KeyboardInterrupt too) `tmp` is removed and the exception goes on."""
    try:
        yield
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
