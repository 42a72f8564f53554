"""sha256 of a file, read in 4 MiB pieces (``hashlib.file_digest`` needs Python >= 3.11).

One function for the package (model cache, evaluation cache) and the build: ``native/upstream.py``
runs before the package is installed and loads this file by its path.
"""
import hashlib
from pathlib import Path
from typing import Union


def sha256_file(path: Union[str, Path]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()
