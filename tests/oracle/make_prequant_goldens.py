"""Write GPTQ and AWQ checkpoints of the test kit's models and their transformers (+ PEFT) goldens.

Usage (needs cargo and the packages in tests/oracle/requirements.txt):

    /path/to/python tests/oracle/make_prequant_goldens.py [--keep DIR]

For each case in CASES it

1. quantizes every layer linear of the test kit's base (round to nearest per group of the input
   dimension; symmetric: zero 2^(bits-1), scale 2·max|w| / (2^bits - 1); asymmetric: the range
   [min(w, 0), max(w, 0)] in 2^bits - 1 steps, zero round(-min / scale)), with f16 scales;
2. packs the codes as the format defines them (GPTQ v1: qweight [in / (32/bits), out] packed
   along the input dimension, qzeros [groups, out / (32/bits)] packed along the output dimension
   holding zero - 1, scales [groups, out] f16, g_idx = i // group_size; AWQ GEMM: qweight
   [in, out / 8] and qzeros [groups, out / 8] packed along the output dimension in the order
   [0, 2, 4, 6, 1, 3, 5, 7], scales [groups, out] f16) and writes tests/goldens/prequant/<case>/
   (config.json with quantization_config, model.safetensors with the other tensors in f16);
3. unpacks those tensors again (independently of step 2), checks that they give the codes of
   step 1, and dequantizes them: w = scale · (q - zero), in f32;
4. runs transformers in f32 on the dequantized weights (and PEFT with the base's adapters) and
   writes tests/goldens/prequant/<case>.json: the sha256 of the dequantized linears (each one's
   f32 little-endian bytes, [out, in] row-major, in sorted name order), logits and greedy
   continuations as the other quantized goldens.

Commit the result. crates/model/tests/prequant_golden.rs loads each checkpoint as a user would,
checks the dequantized weights' hash and compares.
"""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from make_goldens import dumps
from make_quant_goldens import LINEARS, golden_for, load_bf16_aware, lora_bases

ROOT = Path(__file__).resolve().parents[2]
GOLDENS = ROOT / "tests" / "goldens" / "prequant"
# name: (base model, method, bits, group size (-1: per channel), symmetric)
# (qwen2-f32-tied's hidden size, 48, is no multiple of 32: per channel only.)
CASES = {
    "llama-f32-gptq-4bit-g32-sym": ("llama-f32", "gptq", 4, 32, True),
    "llama-f32-gptq-4bit-g64": ("llama-f32", "gptq", 4, 64, False),
    "llama-f32-gptq-8bit-channel": ("llama-f32", "gptq", 8, -1, False),
    "qwen2-f32-tied-gptq-8bit-channel-sym": ("qwen2-f32-tied", "gptq", 8, -1, True),
    "qwen2-f32-tied-gptq-4bit-channel": ("qwen2-f32-tied", "gptq", 4, -1, False),
    "llama-f32-awq-4bit-g32": ("llama-f32", "awq", 4, 32, False),
    "llama-f32-awq-4bit-g64": ("llama-f32", "awq", 4, 64, False),
}
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def quantize(w: np.ndarray, bits: int, group: int, sym: bool, method: str):
    """Codes q [out, in], zeros [out, groups] and f16 scales [out, groups] of w [out, in]."""
    out_f, in_f = w.shape
    group = in_f if group == -1 else group
    g = w.reshape(out_f, in_f // group, group).astype(np.float32)
    maxq = 2**bits - 1
    if sym:
        amax = np.abs(g).max(axis=2)
        scale = (2 * amax / maxq).astype(np.float16)
        zero = np.full(scale.shape, 2 ** (bits - 1), np.int64)
    else:
        lo, hi = np.minimum(g.min(axis=2), 0), np.maximum(g.max(axis=2), 0)
        scale = ((hi - lo) / maxq).astype(np.float16)
        zero = np.rint(-lo / scale.astype(np.float32)).astype(np.int64)
        # GPTQ v1 stores zero - 1, so a zero of 0 would not survive its packing.
        zero = np.clip(zero, 1 if method == "gptq" else 0, maxq)
    assert (scale > 0).all(), "zero scale"
    s = scale.astype(np.float32)[..., None]
    q = np.clip(np.rint(g / s) + zero[..., None], 0, maxq).astype(np.int64)
    return q.reshape(out_f, in_f), zero, scale


def pack_rows(codes: np.ndarray, bits: int) -> np.ndarray:
    """Packs along axis 0: word [r, c] holds codes [r·n + t, c] in bits bits·t."""
    n = 32 // bits
    c = codes.reshape(codes.shape[0] // n, n, codes.shape[1]).astype(np.uint32)
    word = np.zeros((c.shape[0], c.shape[2]), np.uint32)
    for t in range(n):
        word |= c[:, t, :] << np.uint32(bits * t)
    return word.view(np.int32)


def pack_cols(codes: np.ndarray, bits: int, order=None) -> np.ndarray:
    """Packs along axis 1: word [r, c] holds codes [r, c·n + order[t]] in bits bits·t."""
    n = 32 // bits
    order = order or list(range(n))
    c = codes.reshape(codes.shape[0], codes.shape[1] // n, n).astype(np.uint32)
    word = np.zeros(c.shape[:2], np.uint32)
    for t in range(n):
        word |= c[:, :, order[t]] << np.uint32(bits * t)
    return word.view(np.int32)


def pack(q, zero, scale, bits: int, group: int, method: str) -> dict:
    """The module's tensors, from codes [out, in], zeros and scales [out, groups]."""
    in_f = q.shape[1]
    if method == "gptq":
        return {
            "qweight": pack_rows(q.T, bits),
            "qzeros": pack_cols((zero.T - 1) & (2**bits - 1), bits),
            "scales": np.ascontiguousarray(scale.T),
            "g_idx": (np.arange(in_f) // (in_f if group == -1 else group)).astype(np.int32),
        }
    return {
        "qweight": pack_cols(np.ascontiguousarray(q.T), 4, AWQ_ORDER),
        "qzeros": pack_cols(np.ascontiguousarray(zero.T), 4, AWQ_ORDER),
        "scales": np.ascontiguousarray(scale.T),
    }


def unpack_word(words: np.ndarray, bits: int, n: int) -> np.ndarray:
    """[..., k] int32 words → [..., k, n] codes (code t from bits bits·t)."""
    u = words.view(np.uint32)[..., None]
    return ((u >> (np.arange(n, dtype=np.uint32) * bits)) & (2**bits - 1)).astype(np.int64)


def dequantize(t: dict, bits: int, out_f: int, in_f: int, method: str):
    """w [out, in] f32 from the packed tensors, with the codes and zeros read back."""
    n = 32 // bits
    if method == "gptq":
        q = unpack_word(t["qweight"], bits, n).transpose(0, 2, 1).reshape(in_f, out_f).T
        zero = unpack_word(t["qzeros"], bits, n).reshape(-1, out_f).T + 1
        group_of = t["g_idx"].astype(np.int64)
    else:
        inverse = np.argsort(AWQ_ORDER)
        q = unpack_word(t["qweight"], 4, 8)[..., inverse].reshape(in_f, out_f).T
        zero = unpack_word(t["qzeros"], 4, 8)[..., inverse].reshape(-1, out_f).T
        group_of = np.arange(in_f) // (in_f // zero.shape[1])
    scale = t["scales"].astype(np.float32).T
    w = (q - zero[:, group_of]).astype(np.float32) * scale[:, group_of]
    return w, q, zero


def write_case(name: str, base: Path, out: Path, deq: Path) -> str:
    model, method, bits, group, sym = CASES[name]
    tensors = {}
    for f in sorted(base.glob("*.safetensors")):
        tensors.update(load_bf16_aware(f))
    packed, dense, hashes = {}, {}, []
    for key in sorted(tensors):
        w = tensors[key]
        module = key.removesuffix(".weight")
        if not (key.startswith("model.layers.") and module.split(".")[-1] in LINEARS and key.endswith(".weight")):
            # Stored in f16, as GPTQ and AWQ checkpoints store everything but the codes.
            packed[key] = w.astype(np.float16)
            dense[key] = packed[key].astype(np.float32)
            continue
        q, zero, scale = quantize(w, bits, group, sym, method)
        parts = pack(q, zero, scale, bits, group, method)
        back, q2, zero2 = dequantize(parts, bits, *w.shape, method)
        assert np.array_equal(q, q2) and np.array_equal(zero, zero2), f"{name} {key}: packing does not round-trip"
        packed.update({f"{module}.{k}": v for k, v in parts.items()})
        dense[key] = np.ascontiguousarray(back)  # save_file writes the buffer as laid out
        hashes.append(back.astype("<f4").tobytes())
    out.mkdir(parents=True, exist_ok=True)
    save_file(packed, str(out / "model.safetensors"))
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = (
        {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": False, "sym": sym, "checkpoint_format": "gptq"}
        if method == "gptq"
        else {"quant_method": "awq", "bits": bits, "group_size": group, "zero_point": True, "version": "gemm"}
    )
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shutil.copytree(base, deq)
    for f in deq.glob("*.safetensors*"):
        f.unlink()
    save_file(dense, str(deq / "model.safetensors"))
    return hashlib.sha256(b"".join(hashes)).hexdigest()


def main():
    with lora_bases(__doc__, GOLDENS, "quiver-prequant-goldens-") as root:
        for name, (model, method, *_rest) in CASES.items():
            deq = root / f"{name}-dequantized"
            shutil.rmtree(deq, ignore_errors=True)
            digest = write_case(name, root / model, GOLDENS / name, deq)
            golden = golden_for(model, name, deq, root / "adapters")
            golden["dequantized_sha256"] = digest
            (GOLDENS / f"{name}.json").write_text(dumps(golden) + "\n", encoding="utf-8")
            print(f"{name}: {method}, checkpoint {(GOLDENS / name / 'model.safetensors').stat().st_size} bytes")


if __name__ == "__main__":
    main()
