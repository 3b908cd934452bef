#!/usr/bin/env bash
# The deploy/ checks, offline, on a machine with the Rust toolchain, Python 3 and root (CI's):
#  1. the Kubernetes manifests: `kubectl kustomize` renders both overlays, every object validates
#     (deploy/check/validate.py: Kubernetes' schemas, GIE's CRD schemas, cross-references, and a
#     self-test that broken renders are caught);
#  2. the CPU image: built from the release binary without pulling anything, its file system
#     unpacked, and the server started from it as a container runtime would (its entrypoint, env,
#     working directory and non-root user, read-only root) answers /health and a chat request on
#     an adapter through the `openai` client, then drains on SIGTERM and exits 0.
# Installs what it lacks from Debian (buildah, umoci) and PyPI (into target/smoke-venv, which
# scripts/test.sh shares). `podman run` cannot start containers on this kind of machine, so step 2
# runs the unpacked image in a chroot (deploy/check/run_bundle.py).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_INCREMENTAL=0
start=$SECONDS
step() { echo "== $1 ($((SECONDS - start)) s)"; }

step "tools"
missing=()
for tool in buildah umoci objcopy unshare; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing buildah umoci binutils (missing: ${missing[*]})"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends buildah umoci binutils util-linux >/dev/null
fi
# kubectl (with its built-in kustomize) comes with this kind of machine; elsewhere install it
# from your distribution or Kubernetes' package repository.
command -v kubectl >/dev/null || { echo "kubectl not found: it renders the kustomizations" >&2; exit 1; }
venv=target/smoke-venv
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check openai kubernetes-validate jsonschema pyyaml

step "Kubernetes manifests (kubectl $(kubectl version --client -o json | "$venv/bin/python" -c 'import json,sys; v=json.load(sys.stdin); print(v["clientVersion"]["gitVersion"], "kustomize", v.get("kustomizeVersion", "?"))'))"
"$venv/bin/python" deploy/check/validate.py

# scripts/test.sh passes the release binary it already built (with the `cuda` feature, which
# falls back to the CPU here as in a CPU pod).
bin=${QUIVER_DEPLOY_BIN:-}
if [ -z "$bin" ]; then
    step "release binary"
    cargo build --release --locked -p quiver
    bin=target/release/quiver
fi

step "CPU image"
out=target/deploy
deploy/image/build-cpu-image.sh "$bin" "$out"
rm -rf "$out/bundle"
umoci unpack --image "$out/layout:quiver-cpu" "$out/bundle" >/dev/null
# What the image says about itself, as a runtime reads it.
"$venv/bin/python" - "$out/bundle/config.json" <<'PY'
import json, sys
p = json.load(open(sys.argv[1]))["process"]
env = dict(e.split("=", 1) for e in p["env"])
assert p["args"] == ["/usr/local/bin/quiver", "serve"], p["args"]
assert p["user"]["uid"] != 0 and p["user"]["gid"] != 0, p["user"]
assert env.get("QUIVER_PORT") == "8000" and env.get("QUIVER_HOST") == "0.0.0.0", env
print(f"entrypoint {p['args']}, user {p['user']['uid']}:{p['user']['gid']}, cwd {p['cwd']}, port {env['QUIVER_PORT']}")
PY

step "server from the unpacked image"
port=$((20000 + RANDOM % 20000))
log=$out/server.log
unshare --mount --propagation private "$venv/bin/python" deploy/check/run_bundle.py "$out/bundle" \
    "QUIVER_PORT=$port" >"$log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
"$venv/bin/python" - "$port" "$server" <<'PY'
import sys, time, urllib.request
port, pid = sys.argv[1], sys.argv[2]
for _ in range(300):
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
        break
    except Exception:
        time.sleep(0.2)
else:
    sys.exit("the server from the image did not become healthy; see target/deploy/server.log")
uid = next(l.split()[1] for l in open(f"/proc/{pid}/status") if l.startswith("Uid:"))
assert uid != "0", "the server runs as root"
print(f"/health 200; the server runs as uid {uid}")
PY
"$venv/bin/python" tests/smoke/openai_smoke.py "http://127.0.0.1:$port/v1"
kill -TERM "$server"
wait "$server"
trap - EXIT
grep -q "draining" "$log" || { echo "no drain on SIGTERM in $log" >&2; exit 1; }
echo "SIGTERM: drained, exit 0"
step "done"
