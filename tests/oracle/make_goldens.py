"""Compute transformers golden outputs for Quiver's tiny test models.

Usage (from anywhere; needs cargo and the packages in tests/oracle/requirements.txt):

    /path/to/python tests/oracle/make_goldens.py [--keep DIR]

It runs `cargo run --release -p quiver-testkit -- write-goldens <tmp>`, loads every model
with transformers (f32 compute, eager attention; bf16 checkpoints are upcast exactly) and
writes tests/goldens/<name>.json with the sha256 of every model file, tokenizer ids,
last-position logits, an 8-token greedy continuation with top1-top2 margins, and chat
template ids. Commit the result. Rust tests call `quiver_testkit::materialize(name)`,
which rewrites the model and refuses to run if any file hash differs from the golden.

`--keep DIR` writes the models into DIR instead of a temporary directory.
"""

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import tokenizers
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[2]
GOLDENS = ROOT / "tests" / "goldens"
GREEDY_STEPS = 8

# From one or two tokens up to ~40; one with multi-byte UTF-8 (accents, CJK, emoji).
PROMPTS = [
    "The",
    "The quick brown fox",
    "Un café 😀 — 今天很好, καλημέρα!",
    "Once upon a time, in a quiet village by the sea, there lived an old fisherman who talked.",
]

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are a pirate. Answer briefly."},
        {"role": "user", "content": "Hello there!"},
        {"role": "assistant", "content": "Ahoy, matey! What be yer question?"},
        {"role": "user", "content": "Tell me a joke about a fox 🦊."},
    ],
    [
        {"role": "user", "content": "  Translate \"good morning\" into Spanish.  "},
        {"role": "assistant", "content": "Buenos días."},
        {"role": "user", "content": "And into Greek?"},
    ],
]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_models(root: Path) -> list[tuple[str, Path]]:
    out = subprocess.run(
        ["cargo", "run", "--release", "-q", "-p", "quiver-testkit", "--", "write-goldens", str(root)],
        cwd=ROOT,
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    ).stdout
    return [(name, Path(d)) for name, d in (line.split("\t") for line in out.splitlines() if line)]


@torch.no_grad()
def last_logits(model, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids])).logits[0, -1].float()


@torch.no_grad()
def greedy(model, ids: list[int]) -> tuple[list[int], list[float]]:
    """Manual greedy loop with a full recompute at every step (no KV cache involved)."""
    ids = list(ids)
    tokens, margins = [], []
    for _ in range(GREEDY_STEPS):
        top = torch.topk(last_logits(model, ids), 2)
        tok = int(top.indices[0])
        tokens.append(tok)
        margins.append(float(top.values[0] - top.values[1]))
        ids.append(tok)
    return tokens, margins


def check_same_as_tokenizer_json(raw: tokenizers.Tokenizer, text: str, ids: list[int], special: bool):
    """Quiver tokenizes with tokenizer.json alone; transformers must agree with it."""
    raw_ids = raw.encode(text, add_special_tokens=special).ids
    if raw_ids != ids:
        sys.exit(f"transformers ids {ids} differ from tokenizer.json ids {raw_ids} for {text!r}")


def golden_for(name: str, model_dir: Path) -> dict:
    tok = AutoTokenizer.from_pretrained(model_dir)
    raw = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    # transformers 5 renamed `torch_dtype` to `dtype`; 4.x would silently ignore `dtype`.
    dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, attn_implementation="eager", **{dtype_kw: torch.float32}
    ).eval()
    assert all(p.dtype == torch.float32 for p in model.parameters()), "weights must be upcast to f32"
    prompts = []
    for text in PROMPTS:
        ids = tok(text).input_ids
        check_same_as_tokenizer_json(raw, text, ids, True)
        logits = last_logits(model, ids)
        tokens, margins = greedy(model, ids)
        prompts.append(
            {
                "text": text,
                "ids": ids,
                "last_logits": [float(x) for x in logits],
                "greedy": tokens,
                "greedy_margins": margins,
            }
        )
    chats = []
    for messages in CHATS:
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if not isinstance(ids, list):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        check_same_as_tokenizer_json(raw, rendered, ids, False)
        chats.append({"messages": messages, "ids": ids})
    files = {p.name: sha256(p) for p in sorted(model_dir.iterdir()) if p.is_file()}
    return {
        "model": name,
        "generator": {"torch": torch.__version__, "transformers": transformers.__version__},
        "files": files,
        "prompts": prompts,
        "chat": chats,
    }


def dumps(value, indent: int = 0) -> str:
    """JSON with lists of scalars on one line, so goldens stay compact and diffable."""
    pad, inner = " " * indent, " " * (indent + 2)
    if isinstance(value, dict):
        if not value:
            return "{}"
        items = [f"{inner}{json.dumps(k)}: {dumps(v, indent + 2)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        items = [inner + dumps(v, indent + 2) for v in value]
        return "[\n" + ",\n".join(items) + "\n" + pad + "]"
    return json.dumps(value, ensure_ascii=False)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", type=Path, help="write the models here instead of a temp dir")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    torch.use_deterministic_algorithms(True)
    GOLDENS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="quiver-goldens-") as tmp:
        root = args.keep or Path(tmp)
        for name, model_dir in write_models(root):
            golden = golden_for(name, model_dir)
            (GOLDENS / f"{name}.json").write_text(dumps(golden) + "\n", encoding="utf-8")
            margins = sorted(m for p in golden["prompts"] for m in p["greedy_margins"])
            print(
                f"{name}: margins min {margins[0]:.4f} median {margins[len(margins) // 2]:.4f}, "
                f"{sum(m < 0.01 for m in margins)}/{len(margins)} below 0.01",
                file=sys.stderr,
            )


if __name__ == "__main__":
    main()
