"""Checks that Quiver, llama.cpp and transformers + PEFT agree, then prints the results table and
writes the plots (benches/peers/run.sh runs it last).

    python report.py WORK PLOT_DIR [HEADER_LINE...]

The quantized rows (Quiver int8/int4 against llama.cpp Q8_0/Q4_0, when run) come in a second table
(quant_report.py); they are not held to the agreement check, as each system rounds differently.

Reads WORK/workload.json, WORK/quiver.json, WORK/llamacpp.json and WORK/peft.json; writes
WORK/results.md and PLOT_DIR/peers-throughput.png, PLOT_DIR/peers-latency.png. Exits non-zero if
any system's greedy tokens disagree with the others: a fast wrong answer is not a result.

Agreement: transformers + PEFT (f32 compute on the bf16-exact weights) is the reference and also
reports, for its first 8 greedy steps, the gap between its two largest logits. A difference in the
first 8 tokens (first `max_tokens` for shorter requests) is an error unless the reference's gap at
that step is below the pair's tolerance, i.e. a near-tie that rounding can flip: 0.01 for Quiver
(f32 compute like the reference), 0.25 for llama.cpp and for Quiver with `--matmul-precision bf16`
(bf16 activations in their matmuls). Near-ties
must stay rare (at most a quarter of the compared sequences), and adapter 0 must change the greedy
tokens of the agreement prompt (otherwise agreeing would not show that adapters are applied).
"""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from quant_report import quant_table  # noqa: E402

AGREE = 8
TOL = {"quiver": 0.01, "quiver bf16": 0.25, "llama.cpp": 0.25}
BF16 = " bf16"  # label suffix of Quiver's bf16-activation runs (absent without AVX512_BF16)


def percentile(v, p):
    s = sorted(v)
    k = max(1, min(len(s), -(-p * len(s) // 100)))
    return s[int(k) - 1]


class Check:
    def __init__(self):
        self.compared, self.ties, self.errors = 0, [], []

    def seq(self, what, system, ref, ref_margins, got, n=AGREE):
        n = min(n, len(ref))
        self.compared += 1
        if len(got) < n:
            self.errors.append(f"{what}: {system} produced {len(got)} tokens, expected at least {n}")
            return
        for i in range(n):
            if ref[i] != got[i]:
                gap = ref_margins[i] if ref_margins and i < len(ref_margins) else None
                if gap is not None and gap < TOL[system]:
                    self.ties.append(f"{what}: {system} differs at token {i} where the reference's "
                                     f"top-2 logit gap is {gap:.4f} (near-tie, tolerated)")
                else:
                    self.errors.append(
                        f"{what}: {system} {got[:n]} != transformers+PEFT {ref[:n]} (first difference "
                        f"at token {i}, reference top-2 gap {gap if gap is None else round(gap, 4)})")
                return


def main():
    work, plot_dir = Path(sys.argv[1]), Path(sys.argv[2])
    header = sys.argv[3:]
    w = json.load(open(work / "workload.json"))
    q = json.load(open(work / "quiver.json"))
    ll = json.load(open(work / "llamacpp.json"))
    pf = json.load(open(work / "peft.json"))
    # Further rounds of workload 1 (interleaved by run.sh): each system keeps its best.
    extras = [(q, p) for p in sorted(work.glob("quiver-single-*.json"))]
    extras += [(ll, p) for p in sorted(work.glob("llamacpp-[0-9]*.json"))]
    for main_, extra in extras:
        if extra.exists():
            more = json.load(open(extra))
            main_.setdefault("rounds", [main_["agree"]]).append(more["agree"])
            if "bandwidth_gbps" in more:
                main_["bandwidth_gbps"] = max(main_.get("bandwidth_gbps", 0), more["bandwidth_gbps"])
            for label, m in more["single"].items():
                for k, v in m.items():
                    main_["single"][label][k] = max(main_["single"][label][k], v)

    check = Check()
    for label in ["base", "adapter"]:
        ref, gaps = pf["agree"][label], pf["agree_margins"][label]
        for r, agree in enumerate(q.get("rounds", [q["agree"]])):
            check.seq(f"agreement prompt ({label}, round {r + 1})", "quiver", ref, gaps, agree[label])
            if label + BF16 in agree:
                check.seq(f"agreement prompt ({label}, bf16 activations, round {r + 1})", "quiver bf16", ref, gaps,
                          agree[label + BF16])
        for r, agree in enumerate(ll.get("rounds", [ll["agree"]])):
            check.seq(f"agreement prompt ({label}, round {r + 1})", "llama.cpp", ref, gaps, agree[label])
    if pf["agree"]["base"] == pf["agree"]["adapter"]:
        check.errors.append("adapter 0 does not change the agreement prompt's greedy tokens: "
                            "the check could not tell a missing adapter")
    # Quiver's batch runs: f32 first (paired with PEFT's in order), then bf16 activations if run.
    # Under QUIVER_PEERS_WORKLOADS=1 there are no workloads 2 and 3.
    for r in (q, pf):
        r.setdefault("batch", [])
        r.setdefault("slora", [])
    q_f32 = [b for b in q["batch"] if b.get("precision", "f32") == "f32"]
    q_bf16 = [b for b in q["batch"] if b.get("precision") == "bf16"]
    for runs, system in [(q_f32, "quiver"), (q_bf16, "quiver bf16")]:
        if not runs:
            continue
        assert len(runs) == len(pf["batch"]), (system, len(runs), len(pf["batch"]))
        for qb, pb in zip(runs, pf["batch"]):
            assert (qb["name"], qb["batch"]) == (pb["name"], pb["batch"]), (qb["name"], pb["name"])
            for i, (qt, pt) in enumerate(zip(qb["tokens"], pb["tokens"])):
                check.seq(f"batch {pb['batch']} {pb['name']} ({system}), request {i}", system, pt, pb["margins"][i], qt)
    for qs, ps in zip(q["slora"], pf["slora"]):
        for i, (qt, pt) in enumerate(zip(qs["tokens"], ps["tokens"])):
            check.seq(f"S-LoRA {ps['adapters']} adapters, request {i}", "quiver", pt, ps["margins"][i], qt)
    if len(check.ties) * 4 > check.compared:
        check.errors.append(f"{len(check.ties)} of {check.compared} sequences only agree up to near-ties")

    rows = []

    def row(workload, size, qv, peer, pv, note=""):
        ratio = f"**{qv / pv:.2f}×**" if pv else "–"
        pvs = f"{pv:.1f}" if pv else "n/a"
        rows.append(f"| {workload} | {size} | {qv:.1f} | {peer} | {pvs} | {ratio} | {note} |")

    qs1, ls1 = q["single"], ll["single"]
    plen, dsteps = len(w["prefill_prompt"]), w["decode_steps"]
    row("1. prefill, base", f"{plen}-token prompt", qs1["base"]["prefill_tok_s"], "llama.cpp bf16, use_mmap=False",
        ls1["base"]["prefill_tok_s"])
    row("1. prefill, 1 adapter", f"{plen}-token prompt", qs1["adapter"]["prefill_tok_s"], "llama.cpp bf16, use_mmap=False",
        ls1["adapter"]["prefill_tok_s"])
    for label in ["base", "adapter"]:
        if label + BF16 in qs1:
            what = "base" if label == "base" else "1 adapter"
            row(f"1. prefill, {what}, Quiver bf16 activations", f"{plen}-token prompt",
                qs1[label + BF16]["prefill_tok_s"], "llama.cpp bf16, use_mmap=False", ls1[label]["prefill_tok_s"],
                "`--matmul-precision bf16`: activations rounded to bf16 at the matmuls, as llama.cpp does")
    row("1. decode, base", f"batch 1, {dsteps} steps", qs1["base"]["decode_tok_s"], "llama.cpp bf16, use_mmap=False",
        ls1["base"]["decode_tok_s"])
    if "base_mmap" in ls1:
        row("1. decode, base", f"batch 1, {dsteps} steps", qs1["base"]["decode_tok_s"], "llama.cpp bf16, mmap",
            ls1["base_mmap"]["decode_tok_s"], f"llama.cpp's default loading (prefill {ls1['base_mmap']['prefill_tok_s']:.1f} tok/s)")
    qtax = 1 - qs1["adapter"]["decode_tok_s"] / qs1["base"]["decode_tok_s"]
    ltax = 1 - ls1["adapter"]["decode_tok_s"] / ls1["base"]["decode_tok_s"]
    row("1. decode, 1 adapter", f"batch 1, {dsteps} steps", qs1["adapter"]["decode_tok_s"], "llama.cpp bf16, use_mmap=False",
        ls1["adapter"]["decode_tok_s"], f"LoRA tax: Quiver {100 * qtax:.1f}%, llama.cpp {100 * ltax:.1f}%")
    new = w["batch"]["new_tokens"]
    plen2 = len(w["batch"]["prompts"][0])
    for k, (qb, pb) in enumerate(zip(q_f32, pf["batch"])):
        n = pb["batch"]
        what = {"base": "base", "one adapter": "all on 1 adapter",
                "different adapters": f"{n} different adapters"}[pb["name"]]
        peer = "PEFT `adapter_names=`" if pb["name"] == "different adapters" else "transformers+PEFT"
        row(f"2. batch {n}, {what}", f"{n} × ({plen2} prompt + {new} new), end to end", qb["tok_s"], peer,
            pb["tok_s"])
        if q_bf16:
            row(f"2. batch {n}, {what}, Quiver bf16 activations", "same", q_bf16[k]["tok_s"], peer, pb["tok_s"],
                "`--matmul-precision bf16`")
        if pb["name"] == "different adapters":
            rows.append(f"| 2. batch {n}, {what} | same | {qb['tok_s']:.1f} | llama.cpp | n/a | – | "
                        "llama.cpp cannot mix adapters per request (one LoRA set per context) |")
    reqs = w["slora"]["requests"]
    useful = sum(r["max_tokens"] for r in reqs)
    for qs, ps in zip(q["slora"], pf["slora"]):
        note = (f"p50/p99 latency: Quiver {percentile(qs['latency'], 50):.1f}/{percentile(qs['latency'], 99):.1f} s, "
                f"PEFT {percentile(ps['latency'], 50):.1f}/{percentile(ps['latency'], 99):.1f} s "
                f"({ps['groups']} adapter group{'s' if ps['groups'] > 1 else ''})")
        plural = "s" if ps["adapters"] > 1 else ""
        row(f"3. S-LoRA workload, {ps['adapters']} adapter{plural}", f"{len(reqs)} requests, {useful} output tokens",
            qs["tok_s"], "PEFT, one adapter-group at a time", ps["tok_s"], note)

    lines = header + [
        "",
        f"Agreement: {check.compared} greedy sequences compared against transformers+PEFT (first "
        f"{AGREE} tokens): {len(check.errors)} disagreements, {len(check.ties)} near-ties.",
        "",
        "| workload | size | Quiver tok/s | peer | peer tok/s | Quiver/peer | note |",
        "|---|---|---:|---|---:|---:|---|",
    ] + rows
    for t in check.ties:
        lines.append(f"- {t}")
    lines += quant_table(q, ll, pf, w)
    md = "\n".join(lines) + "\n"
    (work / "results.md").write_text(md)
    if q["slora"]:
        plots(q, pf, w, plot_dir)
    if check.errors:
        print(md)
        print("\nFAILED: the systems do not agree on the same greedy prompts:", file=sys.stderr)
        for e in check.errors:
            print(f"  {e}", file=sys.stderr)
        sys.exit(1)
    print(md)


def plots(q, pf, w, plot_dir):
    plot_dir.mkdir(parents=True, exist_ok=True)
    n_req = len(w["slora"]["requests"])
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    xs = [s["adapters"] for s in q["slora"]]
    ax.plot(xs, [s["tok_s"] for s in q["slora"]], "o-", color="tab:blue",
            label=f"Quiver, S-LoRA workload ({n_req} requests)")
    ax.plot(xs, [s["tok_s"] for s in pf["slora"]], "o-", color="tab:orange",
            label="PEFT, one adapter-group at a time")
    mixed_q = [b for b in q["batch"] if b["name"] == "different adapters" and b.get("precision", "f32") == "f32"]
    mixed_p = [b for b in pf["batch"] if b["name"] == "different adapters"]
    ax.plot([b["batch"] for b in mixed_q], [b["tok_s"] for b in mixed_q], "s--", color="tab:blue",
            label="Quiver, batch of n requests on n adapters")
    ax.plot([b["batch"] for b in mixed_p], [b["tok_s"] for b in mixed_p], "s--", color="tab:orange",
            label="PEFT adapter_names=, same batches")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(sorted(set(xs + [b["batch"] for b in mixed_q])))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_yticks([t for t in [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]
                   if ax.get_ylim()[0] / 2 <= t <= ax.get_ylim()[1] * 2])
    ax.set_xlabel("distinct adapters")
    ax.set_ylabel("output tokens/s, end to end (log)")
    ax.set_title("Throughput vs number of adapters (2 threads, same model)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(plot_dir / "peers-throughput.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    pcts = [50, 90, 99]
    width = 0.13
    for k, (s_q, s_p) in enumerate(zip(q["slora"], pf["slora"])):
        for j, p in enumerate(pcts):
            x = k + (j - 1) * 2 * width
            ax.bar(x - width / 2, percentile(s_q["latency"], p), width, color="tab:blue",
                   alpha=0.4 + 0.3 * j, label=f"Quiver p{p}" if k == 0 else None)
            ax.bar(x + width / 2, percentile(s_p["latency"], p), width, color="tab:orange",
                   alpha=0.4 + 0.3 * j, label=f"PEFT p{p}" if k == 0 else None)
    ax.set_xticks(range(len(q["slora"])))
    ax.set_xticklabels([f"{s['adapters']} adapter{'s' if s['adapters'] > 1 else ''}" for s in q["slora"]])
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_yticks([t for t in [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]
                   if ax.get_ylim()[0] / 2 <= t <= ax.get_ylim()[1] * 2])
    ax.set_ylabel("request latency, s (all submitted at t=0; log)")
    ax.set_title(f"S-LoRA workload: latency percentiles ({n_req} requests)")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(plot_dir / "peers-latency.png")
    plt.close(fig)


if __name__ == "__main__":
    main()
