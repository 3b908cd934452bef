"""Compute transformers + PEFT golden outputs for Quiver's deterministic LoRA adapters.

Usage (from anywhere; needs cargo and the packages in tests/oracle/requirements.txt):

    /path/to/python tests/oracle/make_lora_goldens.py [--keep DIR]

It runs `cargo run --release -p quiver-testkit -- write-lora-goldens <tmp>`, which writes
each base model to <tmp>/<base> and each adapter to <tmp>/adapters/<name>. For every base
it loads the model with transformers (f32, eager attention), attaches all of its adapters
with PEFT (`PeftModel.from_pretrained` for the first, `load_adapter` for the rest), checks
that PEFT adapted exactly the modules whose tensors the file holds (same values), and
writes tests/goldens/lora/<base>.json with:

* the sha256 of both files of every adapter;
* `single`: each adapter alone (`set_adapter`) on 1-2 prompts: last-position logits and a
  6-token greedy continuation (full recompute) with top1-top2 margins;
* `mixed`: one batch of equal-length rows, each with its own adapter or none, run as
  `model(input_ids, adapter_names=[...])` ("__base__" for base rows): last-position logits
  per row. The script asserts that every row matches the same ids run alone with that
  adapter (within 1e-4) and that base rows match the plain base model.

Commit the result. Rust tests call `quiver_testkit::materialize_lora(base)`, which rewrites
the model and adapters and refuses to run if any file hash differs from the goldens (the
base model's from tests/goldens/<base>.json, written by make_goldens.py).

`--keep DIR` writes the models and adapters into DIR instead of a temporary directory.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import peft
import torch
import transformers
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from make_goldens import dumps, sha256

ROOT = Path(__file__).resolve().parents[2]
GOLDENS = ROOT / "tests" / "goldens" / "lora"
GREEDY_STEPS = 6
MIXED_LEN = 12
TOL = 1e-4

PROMPTS = [
    "The quick brown fox",
    "Once upon a time, in a quiet village by the sea",
]
# Mixed-batch rows are MIXED_LEN-token windows of this text's ids, one offset per row.
MIXED_TEXT = (
    "Once upon a time, in a quiet village by the sea, there lived an old fisherman who talked "
    "to the gulls every morning and sold his catch at the market before the sun was high."
)

# Per base: the adapter of each mixed row (None = base model). Several ranks, base rows,
# and one adapter in two non-adjacent rows.
MIXED = {
    "llama-f32": [
        "llama-r8-all-linear",
        None,
        "llama-r1-qv",
        "llama-r64-mlp",
        "llama-r8-all-linear",
        "llama-rank-alpha-pattern",
        "llama-bf16-r8",
    ],
    "qwen2-f32-tied": [
        "qwen2-r4-qkv",
        None,
        "qwen2-r8-all-linear-rslora",
        "qwen2-r4-qkv",
        "qwen2-r2-o-down-bf16",
        None,
    ],
}


def write_all(root: Path) -> tuple[dict[str, Path], dict[str, tuple[str, Path]]]:
    out = subprocess.run(
        ["cargo", "run", "--release", "-q", "-p", "quiver-testkit", "--", "write-lora-goldens", str(root)],
        cwd=ROOT,
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    ).stdout
    models, adapters = {}, {}
    for line in out.splitlines():
        kind, name, *rest = line.split("\t")
        if kind == "model":
            models[name] = Path(rest[0])
        else:
            adapters[name] = (rest[0], Path(rest[1]))
    return models, adapters


def load_base(model_dir: Path):
    # transformers 5 renamed `torch_dtype` to `dtype`; 4.x would silently ignore `dtype`.
    dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, attn_implementation="eager", **{dtype_kw: torch.float32}
    ).eval()
    assert all(p.dtype == torch.float32 for p in model.parameters()), "weights must be f32"
    return model


def check_loaded(model, name: str, adapter_dir: Path):
    """PEFT must have adapted exactly the modules the file has tensors for, with its values."""
    want = load_file(str(adapter_dir / "adapter_model.safetensors"))
    got = {}
    for pname, p in model.named_parameters():
        for ab in ("lora_A", "lora_B"):
            suffix = f".{ab}.{name}.weight"
            if pname.endswith(suffix):
                got[pname[: -len(suffix)] + f".{ab}.weight"] = p
    if set(got) != set(want):
        sys.exit(f"{name}: PEFT adapted {sorted(set(got) ^ set(want))} differently from the file")
    for k, t in want.items():
        if not torch.equal(got[k].detach(), t.float()):
            sys.exit(f"{name}: {k} loaded with different values")


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


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def golden_for(base: str, model_dir: Path, adapters: dict[str, Path], stats: dict) -> dict:
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = load_base(model_dir)
    prompt_ids = [tok(t).input_ids for t in PROMPTS]
    text_ids = tok(MIXED_TEXT).input_ids
    rows = MIXED[base]
    assert len(text_ids) >= MIXED_LEN + 3 * len(rows), "mixed text too short"
    mixed_ids = [text_ids[3 * i : 3 * i + MIXED_LEN] for i in range(len(rows))]
    plain = [last_logits(model, ids) for ids in mixed_ids]
    plain_prompts = [last_logits(model, ids) for ids in prompt_ids]

    names = list(adapters)
    model = PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=names[0]).eval()
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    model.eval()
    for name in names:
        check_loaded(model, name, adapters[name])

    single, alone = [], {}
    for k, name in enumerate(names):
        model.set_adapter(name)
        # Every adapter on the first prompt, every other one also on the second.
        for p, ids in enumerate(prompt_ids[: 1 + k % 2]):
            logits = last_logits(model, ids)
            stats[name] = max(stats.get(name, 0.0), max_diff(logits, plain_prompts[p]))
            tokens, margins = greedy(model, ids)
            single.append(
                {
                    "adapter": name,
                    "ids": ids,
                    "last_logits": [float(x) for x in logits],
                    "greedy": tokens,
                    "greedy_margins": margins,
                }
            )
        for i, row in enumerate(rows):
            if row == name:
                alone[i] = last_logits(model, mixed_ids[i])

    batch = torch.tensor(mixed_ids)
    with torch.no_grad():
        out = model(batch, adapter_names=[r or "__base__" for r in rows]).logits[:, -1].float()
    for i, row in enumerate(rows):
        ref = plain[i] if row is None else alone[i]
        d = max_diff(out[i], ref)
        if d > TOL:
            sys.exit(f"{base}: mixed row {i} ({row}) differs from its single run by {d}")
        if row is not None and max_diff(out[i], plain[i]) < 0.05:
            sys.exit(f"{base}: mixed row {i} ({row}) barely differs from the base model")
    return {
        "base": base,
        "generator": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
        "adapters": {
            n: {"files": {f: sha256(adapters[n] / f) for f in ("adapter_config.json", "adapter_model.safetensors")}}
            for n in names
        },
        "single": single,
        "mixed": {
            "rows": [{"adapter": r, "ids": ids} for r, ids in zip(rows, mixed_ids)],
            "last_logits": [[float(x) for x in out[i]] for i in range(len(rows))],
        },
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", type=Path, help="write the models and adapters here instead of a temp dir")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    torch.use_deterministic_algorithms(True)
    GOLDENS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="quiver-lora-goldens-") as tmp:
        models, adapters = write_all(args.keep or Path(tmp))
        for base, model_dir in models.items():
            mine = {n: d for n, (b, d) in adapters.items() if b == base}
            stats = {}
            golden = golden_for(base, model_dir, mine, stats)
            (GOLDENS / f"{base}.json").write_text(dumps(golden) + "\n", encoding="utf-8")
            margins = sorted(m for s in golden["single"] for m in s["greedy_margins"])
            print(
                f"{base}: {len(mine)} adapters; greedy margins min {margins[0]:.4f}, "
                f"{sum(m < 0.01 for m in margins)}/{len(margins)} below 0.01",
                file=sys.stderr,
            )
            for n, d in stats.items():
                print(f"  {n}: max |delta logit| vs base {d:.3f}", file=sys.stderr)


if __name__ == "__main__":
    main()
