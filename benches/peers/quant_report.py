"""The quantized-base table of the peers report (report.py calls `quant_table`): Quiver
`--quantization int8|int4` against llama.cpp Q8_0|Q4_0 at the same bit width, next to bf16.

Each cell "Quiver / llama.cpp = ratio". Quiver's batch-1 decode is also set against the bandwidth
bound of the same run (the best read bandwidth probed just before a decode, divided by the weight
bytes a decode step reads; the best round's fraction). Greedy tokens are counted, not checked:
int8 and int4 round differently in each system, so agreement is reported as the number of
leading tokens that match the f32 reference (transformers + PEFT) out of the first 8.
"""

# (Quiver format, llama.cpp type, column)
QUANT = [("int8", "q8_0", "8-bit"), ("int4", "q4_0", "4-bit")]
I8 = " i8act"  # label suffix of Quiver's `--matmul-precision int8` runs


def leading(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def gb(x):
    return f"{x / 1e9:.3f} GB"


def quant_table(q, ll, pf, w):
    qs, ls = q["single"], ll["single"]
    cols = [(None, None, "bf16")] + [c for c in QUANT if f"{c[0]} base" in qs and f"{c[1]} base" in ls]
    if len(cols) == 1:
        return []
    plen, dsteps = len(w["prefill_prompt"]), w["decode_steps"]

    def qkey(c, label):
        return label if c[0] is None else f"{c[0]} {label}"

    def lkey(c, label):
        return label if c[1] is None else f"{c[1]} {label}"

    def ratio_cell(c, label, metric, suffix=""):
        qv, lv = qs.get(qkey(c, label) + suffix, {}).get(metric), ls.get(lkey(c, label), {}).get(metric)
        if qv is None or lv is None:
            return "–"
        return f"{qv:.1f} / {lv:.1f} = **{qv / lv:.2f}×**"

    rows = []

    def row(name, f):
        rows.append(f"| {name} | " + " | ".join(f(c) for c in cols) + " |")

    row(f"prefill, {plen}-token prompt, base (tok/s)", lambda c: ratio_cell(c, "base", "prefill_tok_s"))
    row(f"prefill, {plen}-token prompt, 1 adapter (tok/s)", lambda c: ratio_cell(c, "adapter", "prefill_tok_s"))
    row(f"decode, batch 1, {dsteps} steps, base (tok/s)", lambda c: ratio_cell(c, "base", "decode_tok_s"))
    row("same, Quiver `--matmul-precision int8`",
        lambda c: "–" if c[0] is None else ratio_cell(c, "base", "decode_tok_s", I8))
    row(f"decode, batch 1, {dsteps} steps, 1 adapter (tok/s)", lambda c: ratio_cell(c, "adapter", "decode_tok_s"))
    row("same, Quiver `--matmul-precision int8`",
        lambda c: "–" if c[0] is None else ratio_cell(c, "adapter", "decode_tok_s", I8))

    def tax(c):
        def t(single, base, adapter):
            b, a = single.get(base, {}).get("decode_tok_s"), single.get(adapter, {}).get("decode_tok_s")
            return f"{100 * (1 - a / b):.1f}%" if a and b else "–"
        out = f"Quiver {t(qs, qkey(c, 'base'), qkey(c, 'adapter'))}"
        if c[0] is not None:
            out += f" (int8 activations {t(qs, qkey(c, 'base') + I8, qkey(c, 'adapter') + I8)})"
        return out + f", llama.cpp {t(ls, lkey(c, 'base'), lkey(c, 'adapter'))}"

    row("LoRA tax, batch-1 decode", tax)
    bw = q.get("bandwidth_gbps", 0.0)
    qw, lw = q.get("weights", {}), ll.get("weights", {})

    def bound(c, suffix=""):
        name = c[0] or "bf16"
        frac = qs.get(qkey(c, "base") + suffix, {}).get("bound_frac")
        if frac is None or name not in qw:
            return "–"
        out = f"Quiver **{100 * frac:.0f}%** ({gb(qw[name])}/token)"
        lname = c[1] or "bf16"
        if lname in lw and bw and not suffix:
            lfrac = ls[lkey(c, "base")]["decode_tok_s"] * lw[lname] / (bw * 1e9)
            out += f", llama.cpp {100 * lfrac:.0f}% ({gb(lw[lname])}/token)"
        return out

    row(f"batch-1 decode vs bandwidth bound (best probe {bw:.1f} GB/s, {q.get('threads', '?')} threads)", bound)
    row("same, Quiver `--matmul-precision int8`", lambda c: "–" if c[0] is None else bound(c, I8))
    qb = {b["weights"]: b for b in q.get("quant_batch", [])}

    def batch8(c):
        name = c[0] or "bf16"
        if name not in qb:
            return "–"
        v = qb[name]["tok_s"]
        if c[0] is None or "bf16" not in qb:
            return f"{v:.1f}"
        return f"{v:.1f} (**{v / qb['bf16']['tok_s']:.2f}×** bf16)"

    n8 = next(iter(qb.values()))["batch"] if qb else 8
    row(f"batch {n8} on {n8} adapters, Quiver only (tok/s, end to end)", batch8)
    row("weight memory, Quiver / llama.cpp",
        lambda c: f"{gb(qw[c[0] or 'bf16'])} / {gb(lw[c[1] or 'bf16'])}"
        if (c[0] or "bf16") in qw and (c[1] or "bf16") in lw else "–")

    qa, la, ref = q["agree"], ll["agree"], pf["agree"]
    n = len(ref["base"])

    def agree(c):
        parts = []
        for who, a, key in [("Quiver", qa, qkey), ("Quiver int8 act.", qa, None), ("llama.cpp", la, lkey)]:
            if key is None:
                if c[0] is None:
                    continue
                labels = [qkey(c, x) + I8 for x in ("base", "adapter")]
            else:
                labels = [key(c, x) for x in ("base", "adapter")]
            if all(lb in a for lb in labels):
                got = [leading(a[lb], ref[x]) for lb, x in zip(labels, ("base", "adapter"))]
                parts.append(f"{who} {got[0]}/{n}, {got[1]}/{n}")
        return "; ".join(parts)

    row(f"greedy agreement with the f32 reference (leading tokens of {n}, base, adapter)", agree)

    def batch_agree(c):
        if c[0] is None or c[0] not in qb or "bf16" not in qb:
            return "–"
        same = [leading(a, b) for a, b in zip(qb[c[0]]["tokens"], qb["bf16"]["tokens"])]
        k = min(n, *(len(t) for t in qb["bf16"]["tokens"]))
        total = len(qb["bf16"]["tokens"][0])
        return f"{sum(s >= k for s in same)} of {len(same)} (leading match {sum(same) / len(same):.1f} of {total} on average)"

    row(f"batch {n8}: requests whose first {n} tokens match the bf16 base's", batch_agree)
    head = " | ".join("bf16" if c[0] is None else f"{c[2]}: Quiver {c[0]} / llama.cpp {c[1].upper()}" for c in cols)
    return [
        "",
        "Quantized base weights (Quiver `--quantization`, LM head int8; llama.cpp GGUFs from its quantize API, "
        "default parameters). Cells: Quiver / llama.cpp = ratio.",
        "",
        f"| workload | {head} |",
        "|---|" + "---:|" * len(cols),
    ] + rows
