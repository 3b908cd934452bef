#!/usr/bin/env bash
# Everything the tests need, from a fresh machine with the Rust toolchain: formatting, lints,
# then the whole test suite (goldens included; they are committed, no Python needed).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "cargo not found: install Rust (rustup) first" >&2; exit 1; }
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
