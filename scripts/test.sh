#!/usr/bin/env bash
# Everything the tests need, from a fresh machine with the Rust toolchain and Python 3: formatting,
# lints, the whole Rust suite (transformers/PEFT goldens are committed, no torch needed), then a
# smoke test of the real server with the official `openai` Python client.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "cargo not found: install Rust (rustup) first" >&2; exit 1; }
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked

# Smoke test: quiver serve (demo model and adapters) + the openai client, in a venv under target/.
cargo build --release --locked -p quiver
venv=target/smoke-venv
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check openai
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
# SIGTERM drains and exits cleanly.
kill -TERM "$server"
wait "$server"
trap - EXIT
