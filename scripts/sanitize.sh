#!/usr/bin/env bash
# ASan + UBSan: build libtca_ggml.so (with the test library and tca-llama-simple) instrumented, in
# its own build directory, and run the fast native/reliability tests against it
# (docs/reliability.md "Sanitizers").
#
#   bash scripts/sanitize.sh [pytest args]     # default: the fast tests of FILES below
#   JOBS=2 BUILD=build/asan bash scripts/sanitize.sh
#
# The Python interpreter is not instrumented, so the ASan runtime is preloaded (LD_PRELOAD) and
# leak detection is off (CPython keeps its objects until exit). TCA_GGML_LIB, TCA_GGML_TEST_LIB
# and TCA_GGML_SIMPLE point the package and the tests at the instrumented build (the subprocesses
# of the tests inherit them). Reports go to $BUILD/reports/{asan,ubsan}.<pid>: ASan stops the
# process at its first error (the test fails; ASAN_HALT=0: it reports and goes on); UBSan reports
# and goes on. The script fails on a failed test, on any ASan report, and on a UBSan report that
# names project code (native/); the summary groups the reports by their first frame.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build/asan}
JOBS=${JOBS:-2}
PY=.venv/bin/python
[ -x "$PY" ] || { echo "run scripts/setup.sh first"; exit 2; }
# -fsanitize-recover=address: with ASAN_HALT=0 a run reports every error and goes on (the
# default, ASAN_HALT=1, stops a process at its first error as usual)
SAN="-fsanitize=address,undefined -fsanitize-recover=address -fno-omit-frame-pointer -fno-sanitize=vptr"
UPSTREAM=$($PY native/upstream.py prepare)

t0=$(date +%s)
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DTCA_UPSTREAM_DIR="$UPSTREAM" \
    -DPython_EXECUTABLE="$PWD/$PY" \
    -DCMAKE_C_FLAGS="$SAN" -DCMAKE_CXX_FLAGS="$SAN" \
    -DCMAKE_SHARED_LINKER_FLAGS="-fsanitize=address,undefined" \
    -DCMAKE_EXE_LINKER_FLAGS="-fsanitize=address,undefined" >"$BUILD.configure.log" 2>&1 \
    || { tail -30 "$BUILD.configure.log"; exit 1; }
nice -n 10 cmake --build "$BUILD" -j "$JOBS" --target tca_ggml tca_ggml_test tca-llama-simple
echo "[sanitize] build: $(( $(date +%s) - t0 )) s"

ASAN_LIB=$(gcc -print-file-name=libasan.so)
REPORTS="$PWD/$BUILD/reports"
rm -rf "$REPORTS" && mkdir -p "$REPORTS"
export LD_PRELOAD="$ASAN_LIB"
export ASAN_OPTIONS="detect_leaks=0:log_path=$REPORTS/asan:allocator_may_return_null=1:detect_stack_use_after_return=0:halt_on_error=${ASAN_HALT:-1}"
export UBSAN_OPTIONS="print_stacktrace=1:log_path=$REPORTS/ubsan"
export TCA_GGML_LIB="$PWD/$BUILD/libtca_ggml.so"
export TCA_GGML_TEST_LIB="$PWD/$BUILD/libtca_ggml_test.so"
export TCA_GGML_SIMPLE="$PWD/$BUILD/tca-llama-simple"
FILES=(tests/test_reliability.py tests/test_native.py tests/test_foundation.py tests/test_tca_model.py
       tests/test_op_tca_select.py tests/test_op_tca_score.py tests/test_fuzz.py)
t0=$(date +%s)
set +e
if [ $# -gt 0 ]; then
    nice -n 10 "$PY" -m pytest -q -p no:cacheprovider "$@"
else
    nice -n 10 "$PY" -m pytest -q -p no:cacheprovider -m "not slow" "${FILES[@]}"
fi
rc=$?
set -e
echo "[sanitize] tests: $(( $(date +%s) - t0 )) s, pytest exit $rc"

n_asan=$(ls "$REPORTS" | grep -c '^asan' || true)
n_ubsan=$(cat "$REPORTS"/ubsan.* 2>/dev/null | grep -c 'runtime error' || true)
echo "[sanitize] ASan reports: $n_asan; UBSan runtime errors: $n_ubsan"
if [ "$n_ubsan" -gt 0 ]; then
    echo "[sanitize] UBSan, distinct sites:"
    cat "$REPORTS"/ubsan.* | grep 'runtime error' | sed 's/^.*\/\(native\|upstream\|\.cache\)/\1/' | sort | uniq -c | sort -rn | head -40
fi
if [ "$n_asan" -gt 0 ]; then
    echo "[sanitize] ASan errors, by kind and first frame (count):"
    cat "$REPORTS"/asan.* | awk '/ERROR: AddressSanitizer/ {kind=$3; getline; getline; print kind, $NF}' | sort | uniq -c | sort -rn
fi
own=$(cat "$REPORTS"/* 2>/dev/null | grep -E 'runtime error|ERROR: AddressSanitizer' -A12 | grep -c "/native/\(src\|llama\|ggml-cpu\|common\)/" || true)
echo "[sanitize] reports in project code (native/): $own"
[ "$rc" -eq 0 ] && [ "$n_asan" -eq 0 ] && [ "$own" -eq 0 ]
