"""Compute transformers (+ PEFT) goldens of Quiver's quantized bases (`--quantization`).

Usage (from anywhere; needs cargo and the packages in tests/oracle/requirements.txt, plus numpy):

    /path/to/python tests/oracle/make_quant_goldens.py [--keep DIR]

It runs `quiver-testkit write-lora-goldens <tmp>` (bases and adapters) and
`quiver-testkit write-quant-goldens <tmp>`, which writes, for each (model, format) the test kit
lists, the model with its weights dequantized as Quiver stores them (each layer's linear weights
in the format, the LM head or a tied embedding in int8). For each one it

1. quantizes the base's weights itself, by the format's definition (crates/tensor/src/quant.rs:
   blocks of 32 along the input dimension, f16 scales, codes round(x / d) half to even; int8
   d = max|x| / 127 rounded up to an f16, int4 d = x_m / -8 rounded to nearest with x_m the
   block's first element of largest magnitude, value (q - 8) d) and checks that every
   dequantized value equals the test kit's;
2. loads the dequantized model with transformers (f32, eager attention) and writes
   tests/goldens/quant/<model>-<format>.json: the sha256 of the dequantized weights, last-position
   logits and an 8-token greedy continuation (with top1-top2 margins) for each prompt, and the
   same (6 tokens) for one prompt with each of the base's listed adapters applied by PEFT.

Commit the result. `crates/model/tests/quant_golden.rs` loads the test kit's model with the
quantization, checks the dequantized weights' hash and compares.
"""

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers
from peft import PeftModel
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from make_goldens import PROMPTS, dumps, greedy, last_logits, sha256

ROOT = Path(__file__).resolve().parents[2]
GOLDENS = ROOT / "tests" / "goldens" / "quant"
LORA_STEPS = 6
ADAPTER_PROMPT = "Once upon a time, in a quiet village by the sea"
# Adapters run on each quantized base: every projection adapted, rsLoRA, bf16 weights.
ADAPTERS = {
    "llama-f32": ["llama-r8-all-linear", "llama-bf16-r8"],
    "qwen2-f32-tied": ["qwen2-r4-qkv", "qwen2-r8-all-linear-rslora"],
}
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def testkit(*args: str) -> list[list[str]]:
    out = subprocess.run(
        ["cargo", "run", "--release", "-q", "-p", "quiver-testkit", "--", *args],
        cwd=ROOT,
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    ).stdout
    return [line.split("\t") for line in out.splitlines() if line]


def blocks(w: np.ndarray) -> np.ndarray:
    """`[rows, cols]` as `[rows, blocks, 32]`, the last block zero-padded."""
    rows, cols = w.shape
    nb = -(-cols // 32)
    padded = np.zeros((rows, nb * 32), np.float32)
    padded[:, :cols] = w
    return padded.reshape(rows, nb, 32)


def dequantize(w: np.ndarray, fmt: str) -> np.ndarray:
    """The format's definition, in numpy (f32 arithmetic throughout)."""
    b = blocks(w.astype(np.float32))
    if fmt == "int8":
        d = (np.abs(b).max(axis=2) / np.float32(127)).astype(np.float32)
        h = d.astype(np.float16)
        low = h.astype(np.float32) < d
        h[low] = np.nextafter(h[low], np.float16(np.inf))
        d = h.astype(np.float32)[..., None]
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(d > 0, np.clip(np.rint(b / d), -127, 127), 0).astype(np.float32)
        v = q * d
    elif fmt == "int4":
        first = np.abs(b).argmax(axis=2)[..., None]
        xm = np.take_along_axis(b, first, axis=2)
        d = (xm / np.float32(-8)).astype(np.float16).astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(d != 0, np.clip(np.rint(np.clip(b / d, -9, 8)) + 8, 0, 15), 8).astype(np.float32)
        v = (q - 8) * d
    else:
        sys.exit(f"unknown format {fmt}")
    assert np.isfinite(d).all(), "scale overflow"
    return v.reshape(w.shape[0], -1)[:, : w.shape[1]].astype(np.float32)


def quantized_as(name: str, fmt: str, tied: bool):
    if name.startswith("model.layers.") and name.endswith(".weight") and name.split(".")[-2] in LINEARS:
        return fmt
    if name == "lm_head.weight" or (tied and name == "model.embed_tokens.weight"):
        return "int8"
    return None


def check_dequantized(base: Path, deq: Path, fmt: str):
    """Quiver's dequantized weights equal the format's definition applied to the base."""
    want = {}
    for f in sorted(base.glob("*.safetensors")):
        want.update({k: v.astype(np.float32) for k, v in load_bf16_aware(f).items()})
    cfg = json.loads((base / "config.json").read_text())
    tied = cfg.get("tie_word_embeddings", False) and "lm_head.weight" not in want
    got = load_file(str(deq / "model.safetensors"))
    assert set(got) == set(want), f"{deq}: tensors {sorted(set(got) ^ set(want))} differ"
    quantized = 0
    for name, w in want.items():
        f = quantized_as(name, fmt, tied)
        ref = dequantize(w, f) if f else w
        if not np.array_equal(got[name], ref):
            bad = np.argwhere(got[name] != ref)[0]
            sys.exit(f"{deq.name}: {name}{list(bad)} is {got[name][tuple(bad)]}, the definition gives {ref[tuple(bad)]}")
        quantized += f is not None
    print(f"{deq.name}: {quantized} quantized tensors match the format's definition", file=sys.stderr)


def load_bf16_aware(path: Path) -> dict:
    """safetensors.numpy cannot read bf16; go through torch for those files."""
    from safetensors.torch import load_file as load_torch

    return {k: v.float().numpy() for k, v in load_torch(str(path)).items()}


def load(model_dir: Path):
    dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    return AutoModelForCausalLM.from_pretrained(
        model_dir, attn_implementation="eager", **{dtype_kw: torch.float32}
    ).eval()


def golden_for(model: str, fmt: str, deq: Path, adapters: Path) -> dict:
    tok = AutoTokenizer.from_pretrained(deq)
    m = load(deq)
    prompts = []
    for text in PROMPTS:
        ids = tok(text).input_ids
        tokens, margins = greedy(m, ids)
        prompts.append(
            {
                "text": text,
                "ids": ids,
                "last_logits": [float(x) for x in last_logits(m, ids)],
                "greedy": tokens,
                "greedy_margins": margins,
            }
        )
    singles = []
    ids = tok(ADAPTER_PROMPT).input_ids
    for name in ADAPTERS.get(model, []):
        peft_model = PeftModel.from_pretrained(load(deq), adapters / name).eval()
        tokens, margins = [], []
        seq = list(ids)
        for _ in range(LORA_STEPS):
            top = torch.topk(last_logits(peft_model, seq), 2)
            tokens.append(int(top.indices[0]))
            margins.append(float(top.values[0] - top.values[1]))
            seq.append(tokens[-1])
        singles.append(
            {
                "adapter": name,
                "ids": ids,
                "last_logits": [float(x) for x in last_logits(peft_model, ids)],
                "greedy": tokens,
                "greedy_margins": margins,
            }
        )
    return {
        "model": model,
        "format": fmt,
        "generator": {"torch": torch.__version__, "transformers": transformers.__version__},
        "dequantized_sha256": sha256(deq / "model.safetensors"),
        "prompts": prompts,
        "adapters": singles,
    }


@contextlib.contextmanager
def lora_bases(doc: str, goldens: Path, prefix: str):
    """Parses `--keep`, sets torch up for the oracle, and yields a folder holding the test kit's
    bases and adapters (`write-lora-goldens`): `--keep`'s, or a temp dir removed afterwards."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", type=Path, help="write the models here instead of a temp dir")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    torch.use_deterministic_algorithms(True)
    goldens.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        root = args.keep or Path(tmp)
        testkit("write-lora-goldens", str(root))
        yield root


def main():
    with lora_bases(__doc__, GOLDENS, "quiver-quant-goldens-") as root:
        for model, fmt, base, deq in testkit("write-quant-goldens", str(root)):
            check_dequantized(Path(base), Path(deq), fmt)
            golden = golden_for(model, fmt, Path(deq), root / "adapters")
            (GOLDENS / f"{model}-{fmt}.json").write_text(dumps(golden) + "\n", encoding="utf-8")
            margins = sorted(m for p in golden["prompts"] for m in p["greedy_margins"])
            print(f"{model}-{fmt}: greedy margins min {margins[0]:.4f}", file=sys.stderr)


if __name__ == "__main__":
    main()
