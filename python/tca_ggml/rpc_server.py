"""ggml's rpc-server, built from the pinned, patched upstream (tools/rpc/rpc-server.cpp linked to
libtca_ggml: the same ggml with the TCA ops and patch 0006), so a remote host runs TCA's layers for
``Llama(..., rpc_servers="host:port", n_gpu_layers=-1, tca=True)``.

    python -m tca_ggml.rpc_server -H 127.0.0.1 -p 50052 [-t THREADS] [-d DEVICE] [-c]

Arguments are upstream's (``-h`` lists them). The server serves one client at a time and has no
authentication: bind it to loopback or a trusted network only (upstream's warning). The program is
installed as ``tca_ggml/bin/tca-rpc-server`` (CMake option TCA_GGML_RPC, on by default);
``TCA_GGML_RPC_SERVER`` points elsewhere (e.g. a CUDA build's). docs/design.md "RPC".
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from .errors import NativeLibraryError

_BIN = Path(__file__).resolve().parent / "bin" / "tca-rpc-server"


def server_path() -> Path:
    """The rpc-server program: $TCA_GGML_RPC_SERVER, else the one installed with the package."""
    env = os.environ.get("TCA_GGML_RPC_SERVER")
    p = Path(env) if env else _BIN
    if not p.is_file():
        raise NativeLibraryError(f"rpc-server not found at {p} (built with the package unless "
                                 f"-DTCA_GGML_RPC=OFF; TCA_GGML_RPC_SERVER overrides the path)")
    return p


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        p = server_path()
    except NativeLibraryError as e:
        print(f"tca_ggml.rpc_server: {e}", file=sys.stderr)
        return 2
    os.execv(str(p), [str(p), *args])
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
