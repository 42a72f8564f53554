#!/usr/bin/env bash
# Rewrite native/patches/*.patch from the prepared tree (.cache/llama.cpp-<ver>) against the
# pristine one (python3 native/upstream.py pristine): edit upstream files in the prepared tree,
# then run this; each patch keeps the files it already lists, in its order.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(python3 -c "import sys; sys.path.insert(0,'native'); import upstream; print(upstream.cache_dir() / ('llama.cpp-' + upstream.PIN_VERSION))")
pristine=$(python3 native/upstream.py pristine)
for p in native/patches/*.patch; do
    files=$(grep '^+++ b/' "$p" | sed 's#^+++ b/##; s#\t.*##')
    tmp=$(mktemp)
    for f in $files; do
        diff -u "$pristine/$f" "$work/$f" | sed "1s#^--- .*#--- a/$f#; 2s#^+++ .*#+++ b/$f#" >> "$tmp" || true
    done
    mv "$tmp" "$p"
done
git diff --stat native/patches
