"""Makes a quantized GGUF from the bf16 GGUF with llama.cpp's own quantize API
(`llama_model_quantize`, what the `llama-quantize` tool calls) and its default parameters.

    python quantize.py IN.gguf OUT.gguf q8_0|q4_0 THREADS

Prints the type each tensor kind got (llama.cpp's defaults pick the LM head's / tied
embedding's type themselves, e.g. Q6_K or a fallback for Q4_0).
"""

import ctypes
import sys
from collections import Counter

import llama_cpp
from gguf import GGUFReader

FTYPES = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0}


def main():
    src, dst, kind, threads = sys.argv[1:5]
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[kind]
    params.nthread = int(threads)
    llama_cpp.llama_backend_init()
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    if rc != 0:
        sys.exit(f"llama_model_quantize({kind}) failed with {rc}")
    types = Counter()
    for t in GGUFReader(dst).tensors:
        kind_of = ".".join(t.name.split(".")[2:]) if t.name.startswith("blk.") else t.name
        types[(kind_of, t.tensor_type.name)] += 1
    print(f"{dst}: " + ", ".join(f"{name} {ty} x{n}" for (name, ty), n in sorted(types.items())))


if __name__ == "__main__":
    main()
