"""Runs llama.cpp's convert_hf_to_gguf.py / convert_lora_to_gguf.py (from the llama-cpp-python
sdist) on the test kit's files.

The test kit writes its own small BPE tokenizer, whose pre-tokenizer hash llama.cpp does not know;
the converter then refuses the model. The benchmark feeds token ids directly (no tokenizer is
involved in any system), so the unknown pre-tokenizer is declared as Qwen2's and everything else
runs unchanged.

    python convert.py LLAMA_CPP_DIR convert_hf_to_gguf.py ARGS...
"""

import runpy
import sys
from pathlib import Path

llama_cpp_dir = Path(sys.argv[1])
script = llama_cpp_dir / sys.argv[2]
sys.path.insert(0, str(llama_cpp_dir))
sys.path.insert(1, str(llama_cpp_dir / "gguf-py"))

from conversion import base  # noqa: E402

_original = base.TextModel.get_vocab_base_pre


def _get_vocab_base_pre(self, tokenizer):
    try:
        return _original(self, tokenizer)
    except NotImplementedError:
        return "qwen2"


base.TextModel.get_vocab_base_pre = _get_vocab_base_pre
sys.argv = [str(script)] + sys.argv[3:]
runpy.run_path(str(script), run_name="__main__")
