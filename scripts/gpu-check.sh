#!/usr/bin/env bash
# On a GPU machine (no Rust, no network): run the parity suites on the GPU and the benchmark,
# with the binaries scripts/build-cuda.sh packed. Run from the repository root (the parity tests
# read tests/fixtures and data/).
#
#   scripts/gpu-check.sh [--dist .cuda/dist] [--out DIR] [--sizes 256,512] [--runs 3]
#                        [--device cuda:0] [--dtypes f32,bf16] [--skip-bench]
#
# Writes to OUT (default: $OUT if set, else gpu-check-out): parity.log, bench-DTYPE.json and
# bench-DTYPE.log per model precision (--dtypes: default f32 and bf16 on a GPU, f32 on the CPU),
# bench-generate-DTYPE.json/.log (batched generation at 1, 4, 8 and 16 images per step),
# gpu-memory-DTYPE.csv (nvidia-smi samples every 200 ms during the benchmark: the peak GPU
# memory of each case, which the benchmark's resident-memory column does not see) and
# summary.txt. The parity run includes tests/half_precision.rs, which trains and samples the
# tiny model in bf16 on the GPU against f32.
# The CUDA libraries besides the driver's libcuda.so.1 (cuBLAS, cuBLASLt, cuRAND, NVRTC, and
# the CUDA runtime, version 13) are looked up in CUDA_LIB_DIRS, then in any Python
# site-packages (PyTorch's nvidia/cu13 wheels) and the usual toolkit folders.
#
# `--device cpu` runs the same flow on the CPU (a check of this script on a machine without a
# GPU; the binaries then start on build-cuda.sh's link stubs).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

dist=".cuda/dist"
out="${OUT:-gpu-check-out}"
sizes="256,512"
runs=3
device="cuda:0"
dtypes=""
bench=1
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dist) dist="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        --sizes) sizes="$2"; shift 2 ;;
        --runs) runs="$2"; shift 2 ;;
        --device) device="$2"; shift 2 ;;
        --dtypes) dtypes="$2"; shift 2 ;;
        --skip-bench) bench=0; shift ;;
        -h | --help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "error: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
if [[ -z "$dtypes" ]]; then
    if [[ "$device" == cpu ]]; then dtypes="f32"; else dtypes="f32,bf16"; fi
fi
mkdir -p "$out"
out=$(cd "$out" && pwd -P)
summary="$out/summary.txt"
: >"$summary"
say() { echo "$*" | tee -a "$summary"; }

pack="$dist/attractor-cuda.tar.xz"
[[ -f "$pack" ]] || { echo "error: $pack not found: build it with scripts/build-cuda.sh and carry $dist" >&2; exit 2; }
work=$(mktemp -d)
python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' "$pack" "$work" ||
    { echo "error: cannot unpack $pack" >&2; exit 2; }
bin="$work/bin"

# Library folders: the driver's libcuda.so.1 is on the system path; the rest come from wheels.
libdirs="${CUDA_LIB_DIRS:-}"
if [[ "$device" == cpu ]]; then
    libdirs="${libdirs:+$libdirs:}$(cd .cuda/toolkit 2>/dev/null && find "$PWD" -path '*/lib64/libcuda.so.1' -printf '%h' -quit)"
fi
for lib in libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13 libcudart.so.13; do
    found=""
    for d in ${libdirs//:/ }; do [[ -e "$d/$lib" ]] && found="$d" && break; done
    if [[ -z "$found" ]]; then
        f=$(python3 -c 'import site, sys; print("\n".join(site.getsitepackages()))' 2>/dev/null |
            while read -r sp; do find "$sp" -name "$lib" 2>/dev/null; done | head -n 1)
        [[ -z "$f" ]] && f=$(find /usr/local/cuda* /usr/lib/x86_64-linux-gnu /opt -name "$lib" 2>/dev/null | head -n 1)
        [[ -n "$f" ]] && found=$(dirname "$f") && libdirs="${libdirs:+$libdirs:}$found"
    fi
    say "library $lib: ${found:-NOT FOUND}"
done
for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib; do
    [[ -e "$d/libcuda.so.1" ]] && libdirs="${libdirs:+$libdirs:}$d"
done
export LD_LIBRARY_PATH="${libdirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if ldd "$bin/attractor" | grep -q "not found"; then
    ldd "$bin/attractor" | grep "not found" | tee -a "$summary"
    echo "error: libraries missing (above); set CUDA_LIB_DIRS to the folders that hold them" >&2
    exit 1
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | sed 's/^/gpu: /' | tee -a "$summary"
"$bin/attractor" --version | tee -a "$summary"

# 1. Parity on the device: every suite of tests/gpu_parity.rs, against the same golden tensors.
export ATTRACTOR_TEST_ROOT="$PWD" ATTRACTOR_TEST_DEVICE="$device" RUST_BACKTRACE=1
"$bin/gpu_parity" --test-threads 1 2>&1 | tee "$out/parity.log"
parity=${PIPESTATUS[0]}
say "parity on $device: $(grep -E '^test result' "$out/parity.log" | tail -n 1) (exit $parity)"
grep -E "max err" "$out/parity.log" >"$out/parity-errors.txt" || true

# 2. The benchmark in each precision, sampling the GPU's memory meanwhile.
if [[ $bench == 1 ]]; then
    for dtype in ${dtypes//,/ }; do
        smi=""
        mem="$out/gpu-memory-$dtype.csv"
        if command -v nvidia-smi >/dev/null && [[ "$device" != cpu ]]; then
            nvidia-smi --query-gpu=timestamp,memory.used --format=csv,noheader,nounits -lms 200 >"$mem" &
            smi=$!
        fi
        "$bin/attractor" bench --device "$device" --dtype "$dtype" --sizes "$sizes" --runs "$runs" \
            --json "$out/bench-$dtype.json" 2>&1 | tee "$out/bench-$dtype.log"
        benchrc=${PIPESTATUS[0]}
        # Batched generation (eval/sample --batch): images per second at each batch, and the
        # projected time of the paper's 10,000-image, 50-step evaluation on this GPU.
        "$bin/attractor" bench --device "$device" --dtype "$dtype" --sizes "$sizes" --runs "$runs" \
            --cases generate --batches 1,4,8,16 --json "$out/bench-generate-$dtype.json" 2>&1 |
            tee "$out/bench-generate-$dtype.log"
        genrc=${PIPESTATUS[0]}
        [[ -n "$smi" ]] && kill "$smi" 2>/dev/null
        say "bench ($dtype) exit $benchrc; generate exit $genrc"
        if [[ -s "$mem" ]]; then
            say "peak GPU memory during the $dtype benchmark: $(awk -F', ' '$2 > m {m = $2} END {print m}' "$mem") MiB"
        fi
    done
fi
rm -rf "$work"
[[ $parity == 0 ]]
