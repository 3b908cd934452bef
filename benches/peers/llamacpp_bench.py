"""llama.cpp (through llama-cpp-python) on workload 1 (benches/peers/run.sh runs it).

    python llamacpp_bench.py WORK/workload.json BASE.gguf LORA.gguf OUT.json [NAME=QUANT.gguf ...]

bf16 GGUF converted from the same safetensors (and each NAME=QUANT.gguf, e.g. q8_0=..., made from
it by quantize.py: rows "NAME base" and "NAME adapter", the same bf16 LoRA on the quantized base),
2 threads, token ids in, greedy argmax over the
logits of the last position. Prefill: one `eval` of the 512-token prompt. Decode: after the 64-token
prompt, `decode_steps` single-token evals, each fed the argmax of the previous logits (the same
loop the Quiver side times). Best of 3 for each (QUIVER_PEERS_REPS). llama.cpp applies one LoRA per context, so it has
no part in the mixed-adapter workloads.
"""

import json
import os
import sys
import time

import llama_cpp
import numpy as np
from llama_cpp import Llama

THREADS = 2
ROUNDS = int(os.environ.get("QUIVER_PEERS_REPS", "3"))  # timed repetitions per row, best counts


def last_argmax(llm):
    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(llm.n_vocab(),))
    return int(np.argmax(logits))


def measure(llm, long, prompt, steps):
    prefill, decode, tokens = 0.0, 0.0, []
    for _ in range(ROUNDS):
        llm.reset()
        t = time.perf_counter()
        llm.eval(long)
        prefill = max(prefill, len(long) / (time.perf_counter() - t))
        llm.reset()
        llm.eval(prompt)
        tokens = [last_argmax(llm)]
        t = time.perf_counter()
        for _ in range(steps):
            llm.eval([tokens[-1]])
            tokens.append(last_argmax(llm))
        decode = max(decode, steps / (time.perf_counter() - t))
    return prefill, decode, tokens


def main():
    workload_path, base, lora, out_path = sys.argv[1:5]
    quants = [a.split("=", 1) for a in sys.argv[5:]]
    w = json.load(open(workload_path))
    long = w["prefill_prompt"]
    prompt = long[: w["decode_prompt_len"]]
    result = {"system": "llama.cpp", "threads": THREADS, "version": llama_cpp.__version__,
              "system_info": llama_cpp.llama_print_system_info().decode(), "single": {}, "agree": {},
              "weights": {}}
    # With a LoRA, llama-cpp-python loads the weights into memory (no mmap); the base model is
    # measured the same way, and also mmap'd (llama.cpp's default), which is slower on this VM.
    configs = [("base", base, None, False), ("adapter", base, lora, False)]
    if os.environ.get("QUIVER_PEERS_WORKLOADS") != "1":  # not in the short run
        configs.append(("base_mmap", base, None, True))
    for name, path in quants:
        configs += [(f"{name} base", path, None, False), (f"{name} adapter", path, lora, False)]
    for label, model, path, mmap in configs:
        llm = Llama(model_path=model, lora_path=path, use_mmap=mmap, n_threads=THREADS,
                    n_threads_batch=THREADS, n_ctx=1024, n_batch=512, n_ubatch=512, verbose=False)
        if path is None and not mmap:
            # Bytes of all tensors as loaded: the weights' memory and what a decode step reads.
            result["weights"][label.removesuffix("base").strip() or "bf16"] = llm._model.size()
        prefill, decode, tokens = measure(llm, long, prompt, w["decode_steps"])
        print(f"llama.cpp {label}: prefill {len(long)} tokens {prefill:.1f} tok/s, "
              f"decode batch 1 {decode:.1f} tok/s", flush=True)
        result["single"][label] = {"prefill_tok_s": prefill, "decode_tok_s": decode}
        if label != "base_mmap":
            result["agree"][label] = tokens[: w["agree_tokens"]]
        del llm
    json.dump(result, open(out_path, "w"))


if __name__ == "__main__":
    main()
