#!/usr/bin/env python3
"""Turns scripts/gpu-check.sh's work folder into $OUT/summary.json and $OUT/summary.md."""
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


def ours_train(work: Path, warmup: int, run="ours-train", mem="ours.gpumem"):
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
        "peak_gpu_used_bytes": gpu_mem(work / mem),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--warmup", type=int, default=2)
    a = ap.parse_args()
    w = a.work
    rep = {"tests": {}}
    try:
        for line in (w / "tests.status").read_text().split():
            name, status = line.split(":", 1)
            rep["tests"][name] = status
    except OSError:
        pass
    copy = load(w / "copy-bw.json") or {}
    name = copy.get("name", "")
    nominal = next((bw for frag, bw in NOMINAL_BW if frag in name), None)
    rep["gpu"] = {"name": name, "nominal_bytes_per_s": nominal, "copy_bytes_per_s": copy.get("copy_bytes_per_s")}

    kernels = {}
    for who, f in (("ours", "nf4-ours.json"), ("reference", "nf4-ref.json")):
        r = load(w / f)
        if not r:
            continue
        entry = {}
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
    rep["kernels"] = kernels

    train = {"ours": ours_train(w, a.warmup),
             "ours_capped": ours_train(w, a.warmup, "ours-capped-train", "ours-capped.gpumem")}
    ref = load(w / "reference-train.json")
    if ref and "tokens_per_s" in ref:
        train["reference"] = {
            "steps": ref["steps"],
            "median_step_s": ref["median_step_s"],
            "tokens_per_s": ref["tokens_per_s"],
            "tokens": sum(ref["tokens"]),
            "peak_rss_bytes": ref.get("peak_rss_bytes"),
            "peak_gpu_used_bytes": gpu_mem(w / "ref.gpumem"),
            "peak_gpu_allocated_bytes": ref.get("peak_gpu_allocated_bytes"),
        }
    rep["train_8b"] = train
    # ours / reference: above 1 is faster for tokens/s, below 1 is smaller for memory.
    to_, tr_ = train.get("ours") or {}, train.get("reference") or {}
    rep["train_8b_ratio"] = {
        key: (to_[key] / tr_[key]) if to_.get(key) and tr_.get(key) else None
        for key in ("tokens_per_s", "median_step_s", "peak_gpu_used_bytes")
    }
    (a.out / "summary.json").write_text(json.dumps(rep, indent=2))

    def f(v, scale=1.0, digits=2):
        return "-" if v is None else f"{v / scale:.{digits}f}"

    def ratio(x, y):
        return "-" if not x or not y else f"{x / y:.2f}"

    lines = [f"# gpu-check on {name or 'unknown GPU'}", "", "## Tests", ""]
    lines += [f"- {k}: {v}" for k, v in rep["tests"].items()] or ["- (none ran)"]
    lines += ["", "## Kernels (median)", "", "| measurement | ours | bitsandbytes | ours/bnb |", "|---|---:|---:|---:|"]
    o, b = kernels.get("ours", {}), kernels.get("reference", {})
    for key, label, scale, unit in (
        ("dequantize_bytes_per_s", "NF4 dequantize 14336x4096 -> bf16, moved bytes", 1e9, "GB/s"),
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
              "GPU); the reference with bf16 compute. ours/ref: above 1 is faster for tokens/s, below 1 is "
              "smaller for memory.", "",
              "| measurement | ours (default config) | reference (bf16) | ours/ref | ours, max_memory 7GiB | ratio |",
              "|---|---:|---:|---:|---:|---:|"]
    to, tr, tn = train.get("ours") or {}, train.get("reference") or {}, train.get("ours_capped") or {}
    for key, label, scale in (
        ("tokens_per_s", "tokens/s", 1),
        ("median_step_s", "median step (s)", 1),
        ("peak_gpu_used_bytes", "peak GPU memory, nvidia-smi (GiB)", 2**30),
        ("peak_gpu_allocated_bytes", "peak torch allocated (GiB)", 2**30),
        ("peak_rss_bytes", "peak host RSS (GiB)", 2**30),
    ):
        lines.append(f"| {label} | {f(to.get(key), scale)} | {f(tr.get(key), scale)} | {ratio(to.get(key), tr.get(key))} "
                     f"| {f(tn.get(key), scale)} | {ratio(tn.get(key), tr.get(key))} |")
    if to.get("tokens") and tr.get("tokens") and abs(to["tokens"] - tr["tokens"]) > 0.01 * tr["tokens"]:
        lines.append(f"\nWarning: token counts differ (ours {to['tokens']}, reference {tr['tokens']}).")
    (a.out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
