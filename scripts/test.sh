#!/usr/bin/env bash
# Everything the tests need, from a fresh machine with the Rust toolchain and Python 3: formatting,
# lints, the whole Rust suite (transformers/PEFT goldens are committed, no torch needed), then a
# smoke test of the real server with the official `openai` Python client.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "cargo not found: install Rust (rustup) first" >&2; exit 1; }
# One clean build per run: incremental caches would only cost disk (several GB on this workspace).
export CARGO_INCREMENTAL=0
df -h . | tail -n 1 | awk '{print "disk free before the build: " $4}'
# A venv under target/ for the Python pieces: the `openai` client for the smoke test, and NVRTC
# from NVIDIA's wheels, which compiles every CUDA kernel to PTX (sm_80, sm_90) without a GPU.
venv=target/smoke-venv
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check openai nvidia-cuda-nvrtc-cu12 nvidia-cuda-runtime-cu12
nvrtc_lib=$(ls -d "$venv"/lib/python3*/site-packages/nvidia/cuda_nvrtc/lib | head -n 1)
export LD_LIBRARY_PATH="$PWD/$nvrtc_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export QUIVER_REQUIRE_NVRTC=1

cargo fmt --all -- --check
# --all-features also lints the `cuda` code paths of the server and CLI.
cargo clippy --workspace --all-targets --all-features --locked -- -D warnings
cargo test --workspace --locked

# Smoke test: quiver serve (demo model and adapters) + the openai client. Built with the CUDA
# backend, so `--device auto` (the default) also exercises the fallback to the CPU here.
cargo build --release --locked -p quiver --features cuda
port=$((20000 + RANDOM % 20000))
./target/release/quiver serve --port "$port" > target/smoke-server.log 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
"$venv/bin/python" - "$port" <<'PY'
import sys, time, urllib.request
for _ in range(150):
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/health", timeout=1)
        break
    except Exception:
        time.sleep(0.2)
else:
    sys.exit("quiver serve did not become healthy; see target/smoke-server.log")
PY
"$venv/bin/python" tests/smoke/openai_smoke.py "http://127.0.0.1:$port/v1"
grep -q "using the CPU" target/smoke-server.log || { echo "no CPU fallback line in target/smoke-server.log" >&2; exit 1; }
# SIGTERM drains and exits cleanly.
kill -TERM "$server"
wait "$server"
trap - EXIT

# deploy/: the Kubernetes manifests validate, and the CPU image serves from its own file system.
QUIVER_DEPLOY_BIN=target/release/quiver scripts/deploy-check.sh
