#!/usr/bin/env bash
# Device run for the CUDA GGML_OP_TCA_ATTN: build, tests, timings. Output under $OUT.
# Here: bash scripts/make_devcarry.sh (+ optionally wheels of cffi/pycparser/pytest/numpy for
# python 3.12 in .devcarry/wheels: the lent machine had no cffi), then on the GPU machine, from
# the repo root with .devcarry carried:  bash scripts/cuda_devrun.sh [build|test|bench|all]...
set -u
cd "$(dirname "$0")/.."
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
LOG=$OUT/log
say() { echo "$@" | tee -a "$LOG"; }
steps=${*:-all}

export PATH=$PATH:/usr/local/cuda/bin
say "== $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader) | $(nvcc --version | tail -1) | $(nproc) cores"
# python deps: use the machine's; extract the carried wheels for any that are missing
missing=$(python3 - <<'PY'
import importlib.util
print(" ".join(m for m in ("numpy", "cffi", "pytest") if importlib.util.find_spec(m) is None))
PY
)
say "== python $(python3 --version 2>&1) missing: [${missing}]"
if [ -n "$missing" ]; then
    python3 - $missing <<'PY'
import sys, zipfile, glob
need = {"numpy": ["numpy"], "cffi": ["cffi", "pycparser"], "pytest": ["pytest", "pluggy", "iniconfig", "packaging", "pygments"]}
for m in sys.argv[1:]:
    for w in need[m]:
        for f in glob.glob(f".devcarry/wheels/{w}-*.whl"):
            zipfile.ZipFile(f).extractall("/tmp/pydeps")
PY
    export PYTHONPATH_EXTRA=/tmp/pydeps
fi

if [[ $steps == *build* || $steps == *all* ]]; then
    mkdir -p /tmp/up && tar xzf .devcarry/upstream.tgz -C /tmp/up
    if [ ! -f build/cuda/CMakeCache.txt ]; then
        gen=Ninja; command -v ninja >/dev/null || gen="Unix Makefiles"
        cmake -S . -B build/cuda -G "$gen" -DCMAKE_BUILD_TYPE=Release -DTCA_UPSTREAM_DIR=/tmp/up -DGGML_CUDA=on \
              -DCMAKE_CUDA_ARCHITECTURES=90a > $OUT/cmake.log 2>&1 || { tail -40 $OUT/cmake.log | tee -a $LOG; exit 1; }
    fi
    if [ -f build/cuda/build.ninja ]; then
        timeout ${BUILD_LIMIT:-480} ninja -C build/cuda -k 0 -j16 tca_ggml > $OUT/build.log 2>&1
    else
        timeout ${BUILD_LIMIT:-480} make -C build/cuda -k -j16 tca_ggml > $OUT/build.log 2>&1
    fi
    rc=$?
    say "== build rc=$rc at $(el) s"
    if [ $rc -ne 0 ]; then
        grep -E -A8 "error|FAILED" $OUT/build.log | head -120 | tee -a $LOG
        exit 1
    fi
    obj=$(find build/cuda -name 'tca-attn.cu.o' | head -1)
    cuobjdump -res-usage "$obj" 2>/dev/null | grep -A1 "Function" | grep -v "^--" | paste - - | \
        sed -E 's/^.*Function ([^:]*):.*REG:([0-9]+) STACK:([0-9]+) SHARED:([0-9]+) LOCAL:([0-9]+).*$/\2 regs stack \3 local \5  \1/' | \
        c++filt | sed -E 's/\(tca_args\)//' | sort -u | tee -a $LOG
fi

export TCA_GGML_LIB=$PWD/build/cuda/libtca_ggml.so PYTHONPATH=python${PYTHONPATH_EXTRA:+:$PYTHONPATH_EXTRA} TCA_NMSE_REPORT=$OUT/nmse.txt
if [[ $steps == *test* || $steps == *all* ]]; then
    say "== tests (ffma/auto) at $(el) s"
    timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_op_tca_attn_cuda.py -k "not mma" 2>&1 | tail -25 | tee -a $LOG
    say "== tests (mma) at $(el) s"
    timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_op_tca_attn_cuda.py -k "mma" 2>&1 | tail -25 | tee -a $LOG
    cat $OUT/nmse.txt 2>/dev/null | tee -a $LOG
    say "== CPU op tests at $(el) s"
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_op_tca_attn.py 2>&1 | tail -4 | tee -a $LOG
fi

if [[ $steps == *bench* || $steps == *all* ]]; then
    say "== bench at $(el) s"
    B="timeout 60 python3 native/bench_tca_attn.py --backend CUDA0 --fa --reps 5"
    for ty in f16 q8_0; do
        for d in 128 64; do
            $B --d $d --n-head 32 --n-head-kv 8 --n-tokens 512 --n-kv 8192 --type $ty --ops 10 2>&1 | grep -v "^ggml_cuda_init\|Device 0" | tee -a $LOG
            $B --d $d --n-head 32 --n-head-kv 8 --n-tokens 1 --n-kv 8192 --type $ty --ops 100 2>&1 | grep -v "^ggml_cuda_init\|Device 0" | tee -a $LOG
        done
    done
    say "-- forced FFMA kernel (TCA_CUDA_ATTN=ffma):"
    TCA_CUDA_ATTN=ffma timeout 60 python3 native/bench_tca_attn.py --backend CUDA0 --reps 5 --d 128 --n-head 32 --n-head-kv 8 \
        --n-tokens 512 --n-kv 8192 --type f16 --ops 10 2>&1 | grep tca | tee -a $LOG
    say "-- f32 K/V (FFMA):"
    timeout 60 python3 native/bench_tca_attn.py --backend CUDA0 --fa --reps 5 --d 128 --n-head 32 --n-head-kv 8 \
        --n-tokens 1 --n-kv 8192 --type f32 --ops 100 2>&1 | grep -v "^ggml_cuda_init\|Device 0" | tee -a $LOG
fi
if [[ $steps == *curve* ]]; then
    # kernel-level forced-density curve: flash_attn_ext over n_ctx rows vs tca_attn over
    # 4096 + p*(n_ctx - 4096) rows, 2048-query prefill ubatch and 1-query decode, 32K/64K/128K
    say "== curve at $(el) s"
    for d in 128 64; do
        timeout ${CURVE_LIMIT:-300} python3 native/bench_tca_attn.py --backend CUDA0 --curve --d $d --n-head 32 \
            --n-head-kv 8 --type f16 --reps 5 --json $OUT/curve_d$d.json 2>&1 | grep -v "^ggml_cuda_init\|Device 0" | tee -a $LOG
        say "-- d=$d done at $(el) s"
    done
fi
say "== done at $(el) s"
