#!/usr/bin/env python3
"""Turns scripts/gpu-check.sh's work folder into $OUT/summary.json and $OUT/summary.md.

    gpu_report.py --work W --out O --steps W/steps.tsv [--mode gpu|cpu]   # the report
    gpu_report.py --work W --figure NAME   # one step's key figure on one line, for the table:
                                           # train_ours, train_ref, train_capped,
                                           # kernels_ours, kernels_ref, dp

summary.json holds every figure: the steps (name, status, seconds, key figure), the tests,
the kernels, the 8B training of both sides and their ratios, the data-parallel comparisons
(max|dw| / max|w| and both evaluations) and the doctor's lines. Standard library only.
"""
import argparse
import csv
import json
import statistics
from pathlib import Path

# Nominal HBM bandwidth (bytes/s) by device name fragment; the measured copy bandwidth is
# reported beside it because it is what a memory-bound kernel can reach in practice.
NOMINAL_BW = [("H200", 4.8e12), ("H100 SXM", 3.35e12), ("H100", 3.35e12), ("A100-SXM4-80GB", 2.039e12),
              ("A100 80GB", 1.935e12), ("A100", 1.555e12), ("L40S", 0.864e12), ("A10", 0.6e12)]


def load(p: Path):
    """The last line of a file as JSON (the tools print their JSON last), or None."""
    try:
        text = p.read_text().strip()
        return json.loads(text.splitlines()[-1]) if text else None
    except (OSError, ValueError, IndexError):
        return None


def nf4_traffic_bytes(numel, blocksize=64, out_bytes=2):
    """Bytes a dequantize must move: packed codes, 8-bit absmax (+ nested fp32 scales), output."""
    blocks = numel // blocksize
    return numel // 2 + blocks + (blocks // 256) * 4 + numel * out_bytes


def gpu_mem(p: Path):
    try:
        return float(p.read_text().split()[0]) * 2**20  # nvidia-smi reports MiB
    except (OSError, ValueError, IndexError):
        return None


def ours_train(work: Path, warmup: int, run="ours-train"):
    """Our 8B run: the timed steps of metrics.csv (after `warmup`), and its peak memories."""
    try:
        with open(work / run / "metrics.csv") as f:
            rows = list(csv.DictReader(f))
    except OSError:
        return None
    prev_t = prev_tok = 0.0
    steps = []
    for r in rows:
        t = float(r["elapsed_s"])
        tok = float(r["tokens_per_s"]) * t
        steps.append((t - prev_t, tok - prev_tok))
        prev_t, prev_tok = t, tok
    timed = steps[warmup:]
    if not timed:
        return None
    summary = load(work / run / "summary.json") or {}
    return {
        "steps": len(timed),
        "median_step_s": statistics.median(s for s, _ in timed),
        "tokens_per_s": sum(t for _, t in timed) / sum(s for s, _ in timed),
        "tokens": round(sum(t for _, t in timed)),
        "peak_rss_bytes": summary.get("peak_mem_bytes"),
        "peak_gpu_used_bytes": gpu_mem(work / f"{run}.gpumem"),
        "memory_plan": summary.get("memory_plan"),
    }


def ref_train(work: Path):
    """The reference's 8B run (capped: fewer timed steps than ours)."""
    ref = load(work / "reference-train.json")
    if not (ref and "tokens_per_s" in ref):
        return None
    return {
        "steps": ref["steps"],
        "median_step_s": ref["median_step_s"],
        "tokens_per_s": ref["tokens_per_s"],
        "tokens": sum(ref["tokens"]),
        "peak_rss_bytes": ref.get("peak_rss_bytes"),
        "peak_gpu_used_bytes": gpu_mem(work / "ref.gpumem"),
        "peak_gpu_allocated_bytes": ref.get("peak_gpu_allocated_bytes"),
    }


def gpu_info(w: Path):
    copy = load(w / "copy-bw.json") or {}
    name = copy.get("name", "")
    nominal = next((bw for frag, bw in NOMINAL_BW if frag in name), None)
    return {"name": name, "nominal_bytes_per_s": nominal, "copy_bytes_per_s": copy.get("copy_bytes_per_s")}


def kernel_figures(w: Path, nominal=None):
    """Medians of bench_kernels (ours) and bench/ref_kernels.py (bitsandbytes)."""
    kernels = {}
    for who, f in (("ours", "nf4-ours.json"), ("reference", "nf4-ref.json")):
        r = load(w / f)
        if not r:
            continue
        entry = {"rows": r.get("rows"), "cols": r.get("cols")}
        for key in ("dequantize_s", "dequantize_into_s", "quantize_s"):
            if r.get(key):
                secs = statistics.median(r[key])
                entry[key] = secs
                if key.startswith("dequantize"):
                    moved = nf4_traffic_bytes(r["numel"])
                    entry[key.replace("_s", "_bytes_per_s")] = moved / secs
                    if nominal:
                        entry[key.replace("_s", "_of_peak")] = moved / secs / nominal
        kernels[who] = entry
    for who, f in (("ours", "adamw-ours.json"), ("reference", "adamw-ref.json")):
        r = load(w / f)
        if r and r.get("step_s"):
            kernels.setdefault(who, {})["adamw8bit_step_s"] = statistics.median(r["step_s"])
    return kernels


def data_parallel(w: Path):
    """dp-<run>.json: max|dw|, max|w|, their ratio, the tolerance, both runs' evaluations."""
    out = {}
    for p in sorted(w.glob("dp-*.json")):
        r = load(p)
        if r:
            out[p.stem[3:]] = r
    return out


def read_steps(p):
    steps = []
    if p and p.is_file():
        for line in p.read_text().splitlines():
            cols = line.split("\t")
            if len(cols) >= 3:
                try:
                    secs = float(cols[2])
                except ValueError:
                    secs = None
                steps.append({"step": cols[0], "status": cols[1], "seconds": secs,
                              "figure": cols[3] if len(cols) > 3 else ""})
    return steps


def _n(v, scale=1.0, fmt=".2f"):
    return "-" if v is None else format(v / scale, fmt)


def _train_line(t):
    if not t:
        return "no figures"
    return (f"{_n(t.get('tokens_per_s'), 1, '.0f')} tok/s, median step {_n(t.get('median_step_s'), 1, '.3f')} s, "
            f"peak GPU {_n(t.get('peak_gpu_used_bytes'), 2**30)} GiB")


def _eval_line(e):
    e = e or {}
    parts = [f"{k} {v:.4f}" for k, v in e.items() if isinstance(v, float) and k != "loss"]
    if isinstance(e.get("loss"), (int, float)):
        parts.append(f"loss {e['loss']:.4f}")
    return " ".join(parts) or "-"


def figure(name: str, w: Path, warmup: int) -> str:
    """One step's key figure, for gpu-check.sh's table."""
    if name == "train_ours":
        return _train_line(ours_train(w, warmup))
    if name == "train_capped":
        return _train_line(ours_train(w, warmup, "ours-capped-train"))
    if name == "train_ref":
        t = ref_train(w)
        a = (t or {}).get("peak_gpu_allocated_bytes")
        return _train_line(t) + (f" (torch allocated {_n(a, 2**30)} GiB)" if a else "")
    if name in ("kernels_ours", "kernels_ref"):
        info = gpu_info(w)
        k = kernel_figures(w, info["nominal_bytes_per_s"]).get("ours" if name == "kernels_ours" else "reference", {})
        if not k:
            return "no figures"
        line = (f"NF4 dequantize {k.get('rows')}x{k.get('cols')} {_n(k.get('dequantize_bytes_per_s'), 1e9, '.1f')} GB/s"
                + (f" ({100 * k['dequantize_of_peak']:.0f}% of peak)" if k.get("dequantize_of_peak") else "")
                + f", AdamW8bit step {_n(k.get('adamw8bit_step_s'), 1e-3)} ms")
        if name == "kernels_ref" and info["copy_bytes_per_s"]:
            line += f"; d2d copy {_n(info['copy_bytes_per_s'], 1e9, '.0f')} GB/s"
        return line
    if name == "dp":
        parts = []
        for run, r in data_parallel(w).items():
            o = r.get("other") or {}
            parts.append(f"{o.get('world_size')} ranks ({run}) vs 1: max|dw|/max|w| {_n(r.get('rel'), 1, '.1e')} "
                         f"(tol {r.get('tol'):g}); eval {_eval_line((r.get('one') or {}).get('eval'))} "
                         f"vs {_eval_line(o.get('eval'))}")
        return "; ".join(parts) or "no comparison"
    raise SystemExit(f"unknown figure {name}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--mode", default="gpu", choices=["gpu", "cpu"])
    ap.add_argument("--steps", type=Path, help="gpu-check.sh's steps.tsv (step, status, seconds, figure)")
    ap.add_argument("--figure", help="print one step's key figure and stop")
    a = ap.parse_args()
    w = a.work
    if a.figure:
        print(figure(a.figure, w, a.warmup))
        return
    if a.out is None:
        ap.error("--out is required without --figure")

    rep = {"mode": a.mode, "steps": read_steps(a.steps), "tests": {}}
    try:
        for line in (w / "tests.status").read_text().split():
            name, status = line.split(":", 1)
            rep["tests"][name] = status
    except OSError:
        pass
    rep["gpu"] = gpu_info(w)
    name, nominal = rep["gpu"]["name"], rep["gpu"]["nominal_bytes_per_s"]
    kernels = kernel_figures(w, nominal)
    rep["kernels"] = kernels
    train = {"ours": ours_train(w, a.warmup), "ours_capped": ours_train(w, a.warmup, "ours-capped-train"),
             "reference": ref_train(w)}
    rep["train_8b"] = train
    # ours / reference: above 1 is faster for tokens/s, below 1 is smaller for memory.
    to, tr, tn = train["ours"] or {}, train["reference"] or {}, train["ours_capped"] or {}
    rep["train_8b_ratio"] = {
        key: (to[key] / tr[key]) if to.get(key) and tr.get(key) else None
        for key in ("tokens_per_s", "median_step_s", "peak_gpu_used_bytes")
    }
    rep["data_parallel"] = data_parallel(w)
    try:
        rep["doctor"] = [ln for ln in (w / "doctor.txt").read_text().splitlines() if ln.startswith("[")]
    except OSError:
        rep["doctor"] = []
    (a.out / "summary.json").write_text(json.dumps(rep, indent=2))

    def f(v, scale=1.0, digits=2):
        return "-" if v is None else f"{v / scale:.{digits}f}"

    def ratio(x, y):
        return "-" if not x or not y else f"{x / y:.2f}"

    where = name or ("the CPU build (--cpu)" if a.mode == "cpu" else "an unknown GPU")
    lines = [f"# gpu-check on {where}", "", "## Steps", "",
             "| step | status | seconds | key figure |", "|---|---|---:|---|"]
    lines += [f"| {s['step']} | {s['status']} | {f(s['seconds'], 1, 1)} | {s['figure']} |" for s in rep["steps"]]
    lines += ["", "## Tests", ""]
    lines += [f"- {k}: {v}" for k, v in rep["tests"].items()] or ["- (none ran)"]
    o, b = kernels.get("ours", {}), kernels.get("reference", {})
    shape = f"{o.get('rows') or b.get('rows')}x{o.get('cols') or b.get('cols')}"
    lines += ["", "## Kernels (median)", "", "| measurement | ours | bitsandbytes | ours/bnb |", "|---|---:|---:|---:|"]
    for key, label, scale, unit in (
        ("dequantize_bytes_per_s", f"NF4 dequantize {shape} -> bf16, moved bytes", 1e9, "GB/s"),
        ("dequantize_into_bytes_per_s", "  into a buffer", 1e9, "GB/s"),
        ("dequantize_of_peak", "  fraction of nominal peak", 0.01, "%"),
        ("quantize_s", "NF4 quantize", 1e-3, "ms"),
        ("adamw8bit_step_s", "AdamW8bit step, 3.4 M params", 1e-3, "ms"),
    ):
        lines.append(f"| {label} ({unit}) | {f(o.get(key), scale)} | {f(b.get(key), scale)} | {ratio(o.get(key), b.get(key))} |")
    cp = rep["gpu"]["copy_bytes_per_s"]
    lines += ["", f"Nominal peak {f(nominal, 1e9, 0)} GB/s; torch device-to-device copy {f(cp, 1e9, 0)} GB/s.", ""]
    lines += ["## QLoRA, Llama-3-8B shape, batch 8", "",
              "Ours in the default configuration (configs/mrpc.yaml, no compute-dtype flag: auto = bf16 on a "
              "GPU); the reference with bf16 compute, capped to a few steps. ours/ref: above 1 is faster for "
              "tokens/s, below 1 is smaller for memory.", "",
              "| measurement | ours (default config) | reference (bf16) | ours/ref | ours, max_memory 7GiB | ratio |",
              "|---|---:|---:|---:|---:|---:|"]
    for key, label, scale in (
        ("tokens_per_s", "tokens/s", 1),
        ("median_step_s", "median step (s)", 1),
        ("peak_gpu_used_bytes", "peak GPU memory, nvidia-smi (GiB)", 2**30),
        ("peak_gpu_allocated_bytes", "peak torch allocated (GiB)", 2**30),
        ("peak_rss_bytes", "peak host RSS (GiB)", 2**30),
    ):
        lines.append(f"| {label} | {f(to.get(key), scale)} | {f(tr.get(key), scale)} | {ratio(to.get(key), tr.get(key))} "
                     f"| {f(tn.get(key), scale)} | {ratio(tn.get(key), tr.get(key))} |")
    if to and tr:
        if to.get("steps") == tr.get("steps"):
            if abs(to["tokens"] - tr["tokens"]) > 0.01 * tr["tokens"]:
                lines.append(f"\nWarning: token counts differ (ours {to['tokens']}, reference {tr['tokens']}).")
        else:
            lines.append(f"\nThe reference is capped: {tr.get('steps')} timed steps against our {to.get('steps')}; "
                         "the rates compare, the totals do not.")
    dp = rep["data_parallel"]
    if dp:
        lines += ["", "## Data parallel (the demo, LoRA dropout 0.1)", "",
                  "| run | ranks | max abs dw | max abs w | dw / w | tol | eval, 1 rank | eval, N ranks |",
                  "|---|---:|---:|---:|---:|---:|---|---|"]
        for run, r in dp.items():
            oth = r.get("other") or {}
            lines.append(f"| {run} | {oth.get('world_size')} | {f(r.get('max_abs_dw'), 1, 8)} | "
                         f"{f(r.get('max_abs_w'), 1, 4)} | {_n(r.get('rel'), 1, '.2e')} | {r.get('tol')} | "
                         f"{_eval_line((r.get('one') or {}).get('eval'))} | {_eval_line(oth.get('eval'))} |")
    (a.out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
