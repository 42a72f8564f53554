"""Reading GGUF key/value metadata (arrays included) with the `gguf` package."""
from __future__ import annotations

from typing import Any, Dict

from .errors import ModelLoadError


def read_metadata(path: str) -> Dict[str, Any]:
    try:
        import gguf
        from gguf import GGUFValueType
        r = gguf.GGUFReader(path, "r")
    except Exception as e:  # corrupt file, wrong format
        raise ModelLoadError(f"cannot read GGUF metadata from {path}: {e}") from e
    out: Dict[str, Any] = {}
    for f in r.fields.values():
        if f.name.startswith("GGUF."):
            continue
        try:
            if f.types and f.types[0] == GGUFValueType.ARRAY:
                sub = f.types[1] if len(f.types) > 1 else None
                if sub == GGUFValueType.STRING:
                    out[f.name] = [bytes(f.parts[i]).decode("utf-8", "replace") for i in f.data]
                else:
                    out[f.name] = [x.item() for i in f.data for x in f.parts[i]]
            elif f.types and f.types[0] == GGUFValueType.STRING:
                out[f.name] = bytes(f.parts[f.data[0]]).decode("utf-8", "replace")
            else:
                out[f.name] = f.parts[f.data[0]][0].item()
        except Exception as e:
            raise ModelLoadError(f"cannot decode GGUF key {f.name!r} in {path}: {e}") from e
    return out
