"""transformers + PEFT on the benchmark's workload (benches/peers/run.sh runs it).

    python peft_bench.py WORK/workload.json OUT.json [agree]

With `agree` (run.sh under QUIVER_PEERS_WORKLOADS=1) only the agreement prompt runs: the
reference tokens and logit gaps of workload 1, no timed workloads.

f32 compute on the test kit's bf16 weights (exact in f32), 2 threads, greedy. Workload 2 uses PEFT's
mixed-batch `adapter_names=` (one batch, every row on its own adapter), workload 3 processes the
requests one adapter-group at a time (a left-padded batch per adapter, in order of first arrival).
Every timing is end to end: `model.generate` from token ids to token ids.
"""

import json
import sys
import time

import torch
import transformers
from peft import PeftModel
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

THREADS = 2
MARGIN_STEPS = 8
# Workload 2's configurations (the Quiver side runs the same list).
BATCHES = [("base", 1), ("base", 8), ("one adapter", 8), ("different adapters", 8),
           ("different adapters", 32)]


class Margins(LogitsProcessor):
    """Records, for the first MARGIN_STEPS steps, each row's gap between its two largest logits
    (how close greedy decoding was to a tie), and leaves the scores unchanged."""

    def __init__(self):
        self.steps = []

    def __call__(self, input_ids, scores):
        if len(self.steps) < MARGIN_STEPS:
            top = torch.topk(scores.float(), 2, dim=-1).values
            self.steps.append((top[:, 0] - top[:, 1]).tolist())
        return scores

    def per_row(self):
        return [list(r) for r in zip(*self.steps)] if self.steps else []


def generate(model, prompts, new_tokens, **kw):
    """Left-pads `prompts` (lists of ids) into one batch; returns (rows of new ids, margins, s)."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    margins = Margins()
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            do_sample=False,
            logits_processor=LogitsProcessorList([margins]),
            pad_token_id=0,
            **kw,
        )
    secs = time.perf_counter() - t
    return out[:, width:].tolist(), margins.per_row(), secs


def main():
    workload_path, out_path = sys.argv[1], sys.argv[2]
    agree_only = sys.argv[3:] == ["agree"]
    w = json.load(open(workload_path))
    torch.set_num_threads(THREADS)
    dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    base = AutoModelForCausalLM.from_pretrained(w["model"], **{dtype_kw: torch.float32})
    # No EOS: every request runs to its length, as `ignore_eos` does for the other systems.
    base.generation_config.eos_token_id = None
    names = [f"a{i}" for i in range(1 if agree_only else len(w["adapters"]))]
    t = time.perf_counter()
    model = PeftModel.from_pretrained(base, w["adapters"][0], adapter_name=names[0]).eval()
    for name, path in zip(names[1:], w["adapters"][1:]):
        model.load_adapter(path, adapter_name=name)
    print(f"peft: loaded {len(names)} adapters in {time.perf_counter() - t:.1f} s", flush=True)
    result = {
        "system": "peft",
        "threads": THREADS,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": __import__("peft").__version__},
    }

    # Agreement prompt (workload 1's decode prompt), base and adapter 0.
    prompt = w["prefill_prompt"][: w["decode_prompt_len"]]
    n = w["agree_tokens"]
    agree, margins = {}, {}
    with model.disable_adapter():
        rows, m, _ = generate(model, [prompt], n)
    agree["base"], margins["base"] = rows[0], m[0]
    model.set_adapter(names[0])
    rows, m, _ = generate(model, [prompt], n)
    agree["adapter"], margins["adapter"] = rows[0], m[0]
    result["agree"], result["agree_margins"] = agree, margins
    if agree_only:
        json.dump(result, open(out_path, "w"))
        return

    # Workload 2: fixed-length prompts, every request asks for the same number of tokens.
    prompts, new = w["batch"]["prompts"], w["batch"]["new_tokens"]
    batch = []
    for name, size in BATCHES:
        p = prompts[:size]
        if name == "base":
            with model.disable_adapter():
                rows, m, secs = generate(model, p, new)
        elif name == "one adapter":
            model.set_adapter(names[0])
            rows, m, secs = generate(model, p, new)
        else:
            rows, m, secs = generate(model, p, new, adapter_names=names[:size])
        tok_s = size * new / secs
        print(f"peft batch {size}, {name}: {tok_s:.2f} tok/s ({secs:.1f} s)", flush=True)
        batch.append({"name": name, "batch": size, "tok_s": tok_s, "latency": [secs] * size,
                      "tokens": rows, "margins": m})
    result["batch"] = batch

    # Workload 3: the S-LoRA requests, one adapter-group at a time (a batch per adapter).
    slora = []
    for k, n_adapters in enumerate(w["slora"]["points"]):
        reqs = w["slora"]["requests"]
        groups = {}
        for i, r in enumerate(reqs):
            groups.setdefault(r["adapter_at"][k], []).append(i)
        tokens, latency, margins = [None] * len(reqs), [0.0] * len(reqs), [None] * len(reqs)
        t0 = time.perf_counter()
        for adapter, members in groups.items():
            model.set_adapter(names[adapter])
            longest = max(reqs[i]["max_tokens"] for i in members)
            rows, m, _ = generate(model, [reqs[i]["prompt"] for i in members], longest)
            done = time.perf_counter() - t0
            for j, i in enumerate(members):
                tokens[i] = rows[j][: reqs[i]["max_tokens"]]
                margins[i] = m[j]
                latency[i] = done
        makespan = time.perf_counter() - t0
        useful = sum(r["max_tokens"] for r in reqs)
        print(f"peft S-LoRA workload, {n_adapters} adapters ({len(groups)} groups): "
              f"{useful / makespan:.2f} tok/s ({makespan:.1f} s)", flush=True)
        slora.append({"name": "slora", "adapters": n_adapters, "groups": len(groups),
                      "tok_s": useful / makespan, "latency": latency, "tokens": tokens,
                      "margins": margins})
    result["slora"] = slora
    json.dump(result, open(out_path, "w"))


if __name__ == "__main__":
    main()
