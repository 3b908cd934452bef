#!/usr/bin/env bash
# Side-by-side benchmark: Quiver vs llama.cpp (llama-cpp-python, bf16 GGUF) and transformers + PEFT
# on the same model files, the same machine, in one run. See benches/peers/README.md.
#
#     benches/peers/run.sh             (everything)
#     benches/peers/run.sh prepare     (only the peers, the model, the adapters and the GGUF files)
#
# Sets the peers up (once) in a folder it owns outside the repo, ${QUIVER_PEERS_HOME:-~/.cache/quiver-peers}:
# a venv with torch, transformers, peft, matplotlib, numpy, gguf (from the llama.cpp sources) and
# llama-cpp-python built from its PyPI sdist (about 11+ minutes on 2 cores; the wheel is kept in
# wheels/ and reused). Then: the test kit writes the Qwen2.5-0.5B-shaped model and 32 rank-16
# adapters, llama.cpp's own convert_hf_to_gguf.py / convert_lora_to_gguf.py (from the sdist)
# convert them, each system runs the workload, and report.py checks that all systems produced the
# same greedy tokens (exit 1 if not), writes docs/peers-*.png and prints the table last.
#
# Quantized rows (issue #17): Quiver `--quantization int8|int4` against llama.cpp Q8_0|Q4_0 GGUFs made
# from the bf16 GGUF by llama.cpp's quantize API (quantize.py), workload 1 and (Quiver only) batch 8
# on 8 adapters, each batch-1 decode against a bandwidth bound probed in the same run.
#
# Environment: QUIVER_PEERS_HOME (the peers folder), QUIVER_PEERS_THREADS (default 2),
# QUIVER_PEERS_PLOTS (where the PNGs go, default docs/), QUIVER_PEERS_SHAPE (qwen2.5-0.5b, the
# default, or llama-3.2-1b), QUIVER_PEERS_QUANT (Quiver formats, default "int8,int4"; "none"),
# QUIVER_PEERS_ROUNDS (interleaved rounds of workload 1, default 3), QUIVER_PEERS_REPS (timed
# repetitions of each workload-1 row within a round, default 3), QUIVER_PEERS_WORKLOADS (1:
# workload 1 and the quantized rows only; PEFT then runs just the agreement prompt),
# QUIVER_BENCH_MODEL (an existing model directory instead of the test kit's), CARGO_TARGET_DIR.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
home=${QUIVER_PEERS_HOME:-$HOME/.cache/quiver-peers}
threads=${QUIVER_PEERS_THREADS:-2}
plots=${QUIVER_PEERS_PLOTS:-$repo/docs}
llama_version=0.3.36
step=${1:-all}
shape=${QUIVER_PEERS_SHAPE:-qwen2.5-0.5b}
quant=${QUIVER_PEERS_QUANT:-int8,int4}
rounds=${QUIVER_PEERS_ROUNDS:-3}
reps=${QUIVER_PEERS_REPS:-3}
workloads=${QUIVER_PEERS_WORKLOADS:-all}
# The default shape keeps the folder it always had.
if [ "$shape" = qwen2.5-0.5b ]; then work=$home/work; else work=$home/work-$shape; fi
export QUIVER_PEERS_SHAPE=$shape QUIVER_PEERS_QUANT=$quant QUIVER_PEERS_WORKLOADS=$workloads QUIVER_PEERS_REPS=$reps
export OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads RAYON_NUM_THREADS=$threads
export TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
mkdir -p "$home" "$work"
log() { echo "[peers $(date -u +%H:%M:%S)] $*" >&2; }
load() { cut -d' ' -f1-3 /proc/loadavg; }
start=$(date +%s)

# --- 1. The peers' environment (skipped when already there) ---------------------------------
venv=$home/venv
py=$venv/bin/python
pip() { "$venv/bin/pip" --disable-pip-version-check -q "$@"; }
[ -x "$py" ] || python3 -m venv "$venv"
if ! "$py" -c "import torch, transformers, peft, matplotlib, numpy, safetensors" 2>/dev/null; then
    log "installing torch, transformers, peft, matplotlib into $venv"
    # The CPU-only torch wheel when its index is reachable (much smaller), else PyPI's.
    pip install torch --index-url https://download.pytorch.org/whl/cpu 2>/dev/null ||
        log "the CPU torch index is not reachable; installing torch from PyPI"
    pip install torch transformers peft matplotlib numpy safetensors sentencepiece
fi
sdist=$home/sdist/llama_cpp_python-$llama_version.tar.gz
if [ ! -f "$sdist" ]; then
    log "downloading the llama-cpp-python $llama_version sdist"
    pip download --no-deps --no-binary llama-cpp-python "llama-cpp-python==$llama_version" -d "$home/sdist"
fi
src=$home/src/llama_cpp_python-$llama_version
llama_cpp=$src/vendor/llama.cpp
if [ ! -f "$llama_cpp/convert_lora_to_gguf.py" ]; then
    mkdir -p "$home/src"
    tar xzf "$sdist" -C "$home/src"
fi
wheel=$(ls "$home"/wheels/llama_cpp_python-"$llama_version"-*.whl 2>/dev/null | head -n1 || true)
if [ -z "$wheel" ]; then
    log "building llama-cpp-python $llama_version from source for this CPU (about 11+ minutes on 2 cores, once; log: $home/build.log)"
    mkdir -p "$home/wheels"
    # Without AMX: on the Emerald Rapids VM its quantized matmul (ggml_backend_amx_mul_mat) died
    # with SIGILL at tileloadd although the kernel grants AMX; every other native ISA stays on.
    noamx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    if ! CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF -DCMAKE_C_FLAGS='$noamx' -DCMAKE_CXX_FLAGS='$noamx'" \
        CMAKE_BUILD_PARALLEL_LEVEL=$threads "$venv/bin/pip" wheel -v --no-deps "$sdist" -w "$home/wheels" >"$home/build.log" 2>&1; then
        tail -n 40 "$home/build.log" >&2
        log "FAILED: building llama-cpp-python (full log: $home/build.log)"
        exit 1
    fi
    wheel=$(ls "$home"/wheels/llama_cpp_python-"$llama_version"-*.whl | head -n1)
fi
if ! "$py" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$llama_version')" 2>/dev/null; then
    pip install --force-reinstall --no-deps "$wheel"
    pip install diskcache jinja2 typing-extensions
fi
"$py" -c "import gguf" 2>/dev/null || pip install "$llama_cpp/gguf-py"

# --- 2. Quiver: build, model and adapters, the workload ---------------------------------------
cd "$repo"
log "building Quiver's side (cargo bench --bench peers)"
cargo bench --locked -q -p quiver-benches --bench peers --no-run
quiver() { cargo bench --locked -q -p quiver-benches --bench peers -- "$@"; }
quiver prepare "$work"
model=$("$py" -c "import json,sys; print(json.load(open(sys.argv[1]))['model'])" "$work/workload.json")
adapter0=$work/adapters/peer-r16-00

# --- 3. llama.cpp's files, converted by llama.cpp's own scripts --------------------------------
mkdir -p "$work/gguf"
base_gguf=$work/gguf/base-bf16.gguf
lora_gguf=$work/gguf/peer-r16-00-bf16.gguf
if [ ! -s "$base_gguf" ] || [ "$model/model.safetensors" -nt "$base_gguf" ]; then
    log "converting the model with convert_hf_to_gguf.py (bf16)"
    "$py" "$repo/benches/peers/convert.py" "$llama_cpp" convert_hf_to_gguf.py "$model" \
        --outtype bf16 --outfile "$base_gguf" >"$work/convert.log" 2>&1 || { tail -n 20 "$work/convert.log" >&2; exit 1; }
fi
if [ ! -s "$lora_gguf" ] || [ "$adapter0/adapter_model.safetensors" -nt "$lora_gguf" ]; then
    log "converting adapter 0 with convert_lora_to_gguf.py (bf16)"
    "$py" "$repo/benches/peers/convert.py" "$llama_cpp" convert_lora_to_gguf.py "$adapter0" --base "$model" \
        --outtype bf16 --outfile "$lora_gguf" >"$work/convert-lora.log" 2>&1 || { tail -n 20 "$work/convert-lora.log" >&2; exit 1; }
fi
# The llama.cpp counterpart of each Quiver format, from the bf16 GGUF by llama.cpp's quantize API.
quant_ggufs=()
for f in ${quant//,/ }; do
    case $f in
        int8) q=q8_0 ;;
        int4) q=q4_0 ;;
        none) continue ;;
        *) log "QUIVER_PEERS_QUANT: unknown format $f"; exit 1 ;;
    esac
    gguf=$work/gguf/base-$q.gguf
    if [ ! -s "$gguf" ] || [ "$base_gguf" -nt "$gguf" ]; then
        log "quantizing the bf16 GGUF to ${q^^} with llama_model_quantize"
        "$py" "$repo/benches/peers/quantize.py" "$base_gguf" "$gguf" "$q" "$threads" >"$work/quantize-$q.log" 2>&1 ||
            { tail -n 20 "$work/quantize-$q.log" >&2; exit 1; }
    fi
    tail -n 1 "$work/quantize-$q.log" >&2
    quant_ggufs+=("$q=$gguf")
done
if [ "$step" = prepare ]; then
    log "prepared $work"
    exit 0
fi

# --- 4. The systems, one after the other ------------------------------------------------------
rm -f "$work"/{quiver,quiver-single*,llamacpp,llamacpp-[0-9]*,peft}.json
loads=()
log "Quiver (load average $(load))"
loads+=("Quiver $(load)")
quiver run "$work" "$work/quiver.json"
llamacpp() { "$py" "$repo/benches/peers/llamacpp_bench.py" "$work/workload.json" "$base_gguf" "$lora_gguf" "$@" ${quant_ggufs[@]+"${quant_ggufs[@]}"}; }
log "llama.cpp (load average $(load))"
loads+=("llama.cpp $(load)")
llamacpp "$work/llamacpp.json"
# More rounds of workload 1 for both, interleaved, so that a busy (or quiet) spell of the
# machine does not decide the batch-1 ratios alone (report.py keeps each system's best).
for round in $(seq 2 "$rounds"); do
    log "workload 1, round $round: Quiver (load average $(load))"
    quiver single "$work" "$work/quiver-single-$round.json"
    log "workload 1, round $round: llama.cpp (load average $(load))"
    llamacpp "$work/llamacpp-$round.json"
done
if [ "$workloads" = 1 ]; then
    log "transformers + PEFT, the agreement prompt only (load average $(load))"
    "$py" "$repo/benches/peers/peft_bench.py" "$work/workload.json" "$work/peft.json" agree
else
    log "transformers + PEFT (load average $(load); the slow part: about 5 minutes on a quiet 2-core machine)"
    loads+=("PEFT $(load)")
    "$py" "$repo/benches/peers/peft_bench.py" "$work/workload.json" "$work/peft.json"
fi
loads+=("end $(load)")

# --- 5. Agreement check, plots, table (last) --------------------------------------------------
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')
mem=$(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo)
versions=$("$py" -c "import torch, transformers, peft, llama_cpp; print(f'torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, llama-cpp-python {llama_cpp.__version__}')")
log "agreement check, plots and table (after $(( ($(date +%s) - start) / 60 )) minutes)"
"$py" "$repo/benches/peers/report.py" "$work" "$plots" \
    "Run $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo '?'): $cpu, $(nproc) cores, $mem; $threads threads for every system; model shape $shape." \
    "Command: \`QUIVER_PEERS_SHAPE=$shape QUIVER_PEERS_QUANT=$quant QUIVER_PEERS_ROUNDS=$rounds QUIVER_PEERS_REPS=$reps QUIVER_PEERS_WORKLOADS=$workloads benches/peers/run.sh\` ($(( ($(date +%s) - start) / 60 )) minutes). Peers: $versions." \
    "Load average (1/5/15 min) when each system started: $(printf '%s; ' "${loads[@]}")"
