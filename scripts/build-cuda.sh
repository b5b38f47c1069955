#!/usr/bin/env bash
# Build attractor's CUDA binary (and the GPU parity test executable) on a machine without a GPU
# or a CUDA toolkit (SPEC.md §1), packed for a GPU machine that has no Rust and no network.
#
#   scripts/build-cuda.sh [--cap 90] [--out .cuda/dist]
#
# 1. nvcc from PyPI (pinned CUDA 13.0 wheels: the lent GPUs' driver 580 loads 13.0 PTX, not 13.5)
#    into .cuda/toolkit, unless CUDA_ROOT already points at a toolkit with bin/nvcc.
# 2. Link stubs: candle-core 0.11.1 links libcuda, libnvrtc, libcurand, libcublas, libcublasLt
#    and libcudart by name. Stub libraries exporting every function cudarc declares (read from
#    cudarc's own sources in the cargo registry) let the linker finish; at run time the real ones
#    are used (the driver's libcuda.so.1, PyTorch's cu13 wheels for the rest). libcudart is the
#    real one from the pinned wheel.
# 3. `cargo build --release --features cuda` (its own target folder, so the CPU build is kept)
#    for the binary and tests/gpu_parity.rs, stripped and packed as OUT/attractor-cuda.tar.xz.
#
# Then carry OUT to the GPU machine and run scripts/gpu-check.sh there. The binary only starts
# where a libcuda.so.1 is on the library path: here that is the stubs (`--device cpu` works, a
# cuda device fails with a clear error); on a GPU machine, the driver's.
#
# Environment: CUDA_COMPUTE_CAP (default 90: H100/H200, sm_90a), CUDA_TOOLKIT_DIR (.cuda/toolkit),
# CUDA_TARGET_DIR (target/cuda), PIP (python3 -m pip).
set -euo pipefail
cd "$(dirname "$0")/.."

cap="${CUDA_COMPUTE_CAP:-90}"
out=".cuda/dist"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --cap) cap="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        -h | --help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "error: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
toolkit="${CUDA_TOOLKIT_DIR:-.cuda/toolkit}"
target="${CUDA_TARGET_DIR:-target/cuda}"
pip="${PIP:-python3 -m pip}"
# The pins of SPEC.md §1.
wheels=(nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-runtime==13.0.96
    nvidia-cuda-crt==13.0.88 nvidia-cuda-cccl==13.0.85)

# 1. The toolkit.
if [[ -n "${CUDA_ROOT:-}" && -x "${CUDA_ROOT}/bin/nvcc" ]]; then
    root="$CUDA_ROOT"
else
    nvcc=$(find "$toolkit" -path '*/bin/nvcc' -type f 2>/dev/null | head -n 1 || true)
    if [[ -z "$nvcc" ]]; then
        echo "installing nvcc from PyPI into $toolkit: ${wheels[*]}"
        $pip install --quiet --no-deps --target "$toolkit" "${wheels[@]}" || {
            echo "error: could not install the CUDA wheels from PyPI into $toolkit; set" \
                "CUDA_ROOT to an installed toolkit (with bin/nvcc) instead" >&2
            exit 1
        }
        nvcc=$(find "$toolkit" -path '*/bin/nvcc' -type f | head -n 1)
    fi
    [[ -n "$nvcc" ]] || { echo "error: no bin/nvcc under $toolkit" >&2; exit 1; }
    root=$(cd "$(dirname "$nvcc")/.." && pwd -P)
fi
export CUDA_ROOT="$root" PATH="$root/bin:$PATH" CUDA_COMPUTE_CAP="$cap"
nvcc --version | tail -n 2

# 2. Link stubs, in CUDA_ROOT/lib64 (where cudarc's build script looks), under the plain names
#    the linker wants and the versioned names (sonames) the binary will ask for at run time.
stubs="$root/lib64"
mkdir -p "$stubs"
cudarc=$(cargo metadata --format-version 1 --locked --features cuda |
    python3 -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"] == "cudarc"))')
cudarc=$(dirname "$cudarc")
# library  soname  cudarc modules whose functions it exports
libs=(
    "cuda libcuda.so.1 driver"
    "nvrtc libnvrtc.so.13 nvrtc"
    "curand libcurand.so.10 curand"
    "cublas libcublas.so.13 cublas"
    "cublasLt libcublasLt.so.13 cublaslt"
    "cudart libcudart.so.13 runtime"
)
for spec in "${libs[@]}"; do
    read -r name soname modules <<<"$spec"
    # The CUDA runtime of the nvidia-cuda-runtime wheel is the real one: candle-kernels' MoE
    # library also calls cudart's internal launch and registration functions (__cudaLaunchKernel,
    # __cudaRegisterFatBinary, ...), which cudarc does not declare. It loads without a GPU.
    if [[ -e "$root/lib/$soname" ]]; then
        ln -sf "../lib/$soname" "$stubs/lib$name.so"
        ln -sf "../lib/$soname" "$stubs/$soname"
        rm -f "$stubs/stub-$name.c"
        continue
    fi
    c="$stubs/stub-$name.c"
    : >"$c"
    for m in $modules; do
        grep -ohE 'pub unsafe fn [A-Za-z_][A-Za-z0-9_]*' "$cudarc/src/$m/sys/mod.rs" |
            awk '{print $4}' | sort -u | sed 's/.*/void &(void) {}/' >>"$c"
    done
    gcc -shared -fPIC -w -Wl,-soname,"$soname" -o "$stubs/lib$name.so" "$c"
    ln -sf "lib$name.so" "$stubs/$soname"
done
echo "link stubs: $stubs ($(grep -c . "$stubs"/stub-*.c | awk -F: '{s+=$2} END {print s}') functions)"

# 3. The build. LD_LIBRARY_PATH: build scripts and `cargo test --no-run` do not run the
#    binaries, but a stub libcuda.so.1 keeps anything that does from failing to start.
export LD_LIBRARY_PATH="$stubs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export CARGO_TARGET_DIR="$target"
cargo build --release --locked --features cuda --bin attractor
test_exe=$(cargo test --release --locked --features cuda --test gpu_parity --no-run \
    --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "gpu_parity":
        print(m["executable"])' | tail -n 1)
[[ -n "$test_exe" ]] || { echo "error: the gpu_parity test executable was not built" >&2; exit 1; }

mkdir -p "$out"
stage=$(mktemp -d)
mkdir -p "$stage/bin"
cp "$target/release/attractor" "$stage/bin/attractor"
cp "$test_exe" "$stage/bin/gpu_parity"
strip "$stage/bin/attractor" "$stage/bin/gpu_parity"
# Both must at least start here (on the stubs) and say what they are.
"$stage/bin/attractor" --version
"$stage/bin/gpu_parity" --list >/dev/null
# One xz stream with a dictionary larger than either executable: most of their bytes (candle's
# kernels) are shared, so the pack is about 12 MB instead of 19, small enough to travel with the
# repository to a GPU machine (the device tool's 64 MiB limit).
tar -C "$stage" -cf - bin | xz -9e -T1 --lzma2=preset=9e,dict=192MiB >"$out/attractor-cuda.tar.xz.tmp"
mv "$out/attractor-cuda.tar.xz.tmp" "$out/attractor-cuda.tar.xz"
rm -rf "$stage"
ls -l "$out/attractor-cuda.tar.xz"
echo "built for sm_$cap; on the GPU machine: scripts/gpu-check.sh (carry $out)"
