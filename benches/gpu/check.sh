#!/usr/bin/env bash
# The GPU check, on a machine with an NVIDIA GPU (sized for one H200, 16 cores: under 8 minutes
# including the build):
#   1. build the server with the CUDA backend;
#   2. every kernel against the CPU backend on fresh random inputs, then the transformers/PEFT
#      goldens on CUDA (crates/cuda/tests/gpu_kernels.rs, gpu_quant.rs, gpu_goldens.rs);
#   3. the server's API tests on CUDA (QUIVER_TEST_DEVICE=cuda);
#   4. the GPU benchmark (crates/cuda/benches/gpu.rs): LoRA kernels against the bandwidth they
#      must use, end-to-end decode with 1/8/64 adapters; its Markdown table is printed last.
# QUIVER_REQUIRE_GPU=1 turns "no GPU" into a failure everywhere. Usage: benches/gpu/check.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
start=$(date +%s)
step() { printf '\n==> [%ss] %s\n' "$(( $(date +%s) - start ))" "$*"; }

command -v cargo >/dev/null || { echo "cargo not found: install Rust (rustup) first" >&2; exit 1; }
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
else
    echo "nvidia-smi not found (continuing: the tests report whether a GPU is usable)"
fi

# cudarc loads libcuda, libnvrtc and libcublas at run time. libcuda comes with the driver; NVRTC
# and cuBLAS come from a CUDA 12 install or NVIDIA's pip wheels. Add the first directory holding
# each library to LD_LIBRARY_PATH if the loader does not already find it.
find_lib() { # $1 = library file name; prints the first directory holding it
    local d ldp="${LD_LIBRARY_PATH:-}"
    for d in ${ldp//:/ } /usr/local/cuda/lib64 /usr/local/cuda-12*/lib64 /usr/lib/x86_64-linux-gnu \
        /usr/local/cuda*/targets/x86_64-linux/lib /opt/conda/lib \
        target/smoke-venv/lib/python3*/site-packages/nvidia/*/lib \
        "$HOME"/.local/lib/python3*/site-packages/nvidia/*/lib \
        /usr/local/lib/python3*/dist-packages/nvidia/*/lib /usr/lib/python3*/dist-packages/nvidia/*/lib \
        /usr/local/lib/python3*/site-packages/nvidia/*/lib; do
        [ -e "$d/$1" ] && { echo "$d"; return 0; }
    done
    return 1
}
for lib in libcuda.so.1 libnvrtc.so.12 libcublas.so.12 libcublasLt.so.12; do
    # awk reads all of ldconfig's output (no SIGPIPE under pipefail).
    known=$( (ldconfig -p 2>/dev/null || true) | awk -v l="$lib" '$1 == l { p = $NF } END { print p }')
    if [ -n "$known" ]; then
        echo "$lib: found by the loader ($known)"
    elif dir=$(find_lib "$lib"); then
        case ":${LD_LIBRARY_PATH:-}:" in
            *":$dir:"*) ;;
            *) export LD_LIBRARY_PATH="$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ;;
        esac
        echo "$lib: using $dir"
    elif [ "$lib" = libcuda.so.1 ]; then
        echo "$lib: not found (it comes with the NVIDIA driver)"
    else
        echo "$lib: not found (install CUDA 12, or: pip install nvidia-cuda-nvrtc-cu12 nvidia-cublas-cu12)"
    fi
done
echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
export QUIVER_REQUIRE_GPU=1
# Kernels compiled by NVRTC are cached here, so later runs skip the compiler.
export QUIVER_PTX_CACHE="${QUIVER_PTX_CACHE:-$PWD/target/ptx-cache}"

step "build: quiver with the CUDA backend (release)"
cargo build --release --locked -p quiver --features cuda

step "kernels vs the CPU backend, then the goldens on CUDA"
cargo test --release --locked -p quiver-cuda --test gpu_kernels --test gpu_quant --test gpu_goldens -- --nocapture --test-threads=1

step "server API tests on CUDA"
QUIVER_TEST_DEVICE=cuda cargo test --release --locked -p quiver-server --features cuda

step "GPU benchmark (its table comes last)"
cargo bench --locked -p quiver-cuda --bench gpu
# No line after the benchmark: its table is the last thing printed.
