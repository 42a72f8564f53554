#!/usr/bin/env bash
# Run the test suite (the same command CI runs). Sets up first if needed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m tca_ggml.models fetch smollm2-135m >/dev/null
# pytest exit 5 ("no tests collected") must fail, as must any failure.
python -m pytest -q "$@"
