#!/usr/bin/env python3
"""`make bench`: our kernels and trainer side by side with the reference stack, on this CPU.

Rows (see bench/README.md for what each measures):
  1. NF4 quantize / dequantize throughput, GB/s of bf16 weight (4096 x 4096)
  2. one AdamW8bit step on the Llama-3-8B LoRA r=8 q/v + head shapes (3.4 M parameters)
  3. QLoRA training on a SmolLM2-135M-shaped Llama, batch 8, MRPC rows: tokens/s, peak RSS
  4. (BENCH_8B=1) peak RSS while loading a Llama-3-8B-shaped checkpoint in 4 bit
  5. serving /predict on the SmolLM2 shape at 1, 8 and 64 concurrent clients: requests/s and
     p50/p99 latency, beside transformers' pipeline("text-classification") on the merged
     checkpoint answering the same requests one batch at a time
  6. the machine's matmul peak for the row-3 layer shapes (fp32, bf16) and row 3's training
     throughput as a fraction of it (training FLOPs per token x tokens/s / peak)
  7. how cost grows: tokens/s and peak RSS at sequence lengths 128/512/2048 (batch 8) and batch
     sizes 1/8/32 (length 128), ours and the reference's; scaling.csv and its charts
  8. eval / predict throughput (rows/s) on MRPC dev with a row-3-shaped adapter, against the
     reference's 4-bit + PEFT inference

Every measurement runs in its own process, ours and the reference's alternating, with the
same torch thread count; medians over the repetitions. Knobs (environment variables):
  BENCH_THREADS=2  BENCH_REPS=3  BENCH_WARMUP=1  BENCH_STEPS=5  BENCH_KERNEL_REPS=5
  BENCH_SERVE_CLIENTS=1,8,64  BENCH_8B=0 (1 adds row 4, writes ~16 GB under bench/cache)  BENCH_8B_REF=1 (row 4's
  reference load, ~10+ minutes on 2 cores)  BENCH_ROWS=1,2,3 (which rows)
  BENCH_TRAIN_VARIANTS (row 3's runs)  BENCH_GEMM_M=512  BENCH_SCALING=128x8,512x8,2048x8,128x1,128x32
  BENCH_SCALING_WARMUP=1  BENCH_SCALING_STEPS=1  BENCH_SCALING_REPS=1  BENCH_SCALING_CAPPED=2048x8
  BENCH_INFER_ROWS=408  BENCH_INFER_REPS
  BENCH_NO_BUILD=1 (use the binaries already built)  BENCH_CARGO_ARGS (extra cargo flags)
  BENCH_BIN_DIR (take qlora-cls and bench_kernels from this folder; no build)
Outputs: the table on stdout and bench/results/{summary,kernels,train}.csv, raw JSON and
logs under bench/results/.
"""
import csv
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
CACHE = BENCH / "cache"
PY = sys.executable
PERFECT = "Does sentence 1 mean the same as sentence 2?"
GB = 1e9
GiB = 1 << 30


def env_int(name, default):
    v = os.environ.get(name, "").strip()
    return int(v) if v else default


THREADS = env_int("BENCH_THREADS", 2)
REPS = env_int("BENCH_REPS", 3)
WARMUP = env_int("BENCH_WARMUP", 1)
STEPS = env_int("BENCH_STEPS", 5)
KREPS = env_int("BENCH_KERNEL_REPS", 5)
BATCH = 8
SEED = 42
ROWS = {int(x) for x in os.environ.get("BENCH_ROWS", "1,2,3,5,6,7,8").split(",") if x.strip()}
# Row 3's variants, in the order they run within a repetition (ours and the reference alternate).
TRAIN_VARIANTS = [x.strip() for x in os.environ.get(
    "BENCH_TRAIN_VARIANTS",
    "ours,reference,ours_bf16,reference_bf16,ours_gc,ours_default,"
    "ours_all_linear_r16,reference_all_linear_r16,ours_dora,reference_dora").split(",") if x.strip()]
# Row 6: the token count (rows of x) of the timed matmuls: a row-3 batch is 8 x ~64 tokens.
GEMM_M = env_int("BENCH_GEMM_M", 512)
# Row 7: (sequence length, batch size) pairs, "SEQxBATCH".
SCALING = [tuple(int(v) for v in x.strip().lower().split("x")) for x in
           os.environ.get("BENCH_SCALING", "128x8,512x8,2048x8,128x1,128x32").split(",") if x.strip()]
SCALING_WARMUP = env_int("BENCH_SCALING_WARMUP", 1)
SCALING_STEPS = env_int("BENCH_SCALING_STEPS", 1)
SCALING_REPS = env_int("BENCH_SCALING_REPS", 1)
# Row 7 points where ours also runs with `--max_memory` set to the reference's measured peak.
SCALING_CAPPED = {x.strip().lower() for x in os.environ.get("BENCH_SCALING_CAPPED", "2048x8").split(",")
                  if x.strip()}
# Row 8: MRPC dev rows scored (408 = all of them) and repetitions.
INFER_ROWS = env_int("BENCH_INFER_ROWS", 408)
INFER_REPS = env_int("BENCH_INFER_REPS", REPS)
SERVE_CLIENTS = [int(x) for x in os.environ.get("BENCH_SERVE_CLIENTS", "1,8,64").split(",") if x.strip()]
if os.environ.get("BENCH_8B", "0") == "1":
    ROWS.add(4)
LOAD_LIMIT_8B = 7 * GB


def child_env():
    env = dict(os.environ)
    env.update(
        {
            "OMP_NUM_THREADS": str(THREADS),
            "MKL_NUM_THREADS": str(THREADS),
            "PYTHONUNBUFFERED": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_VERBOSITY": "error",
            "TOKENIZERS_PARALLELISM": "false",
        }
    )
    return env


class Failed(Exception):
    pass


def run_child(name, argv, timeout=3600):
    """Runs argv with stdout/stderr to logs; returns (stdout text, peak RSS bytes, seconds)."""
    logs = RESULTS / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    out_p, err_p = logs / f"{name}.out", logs / f"{name}.err"
    print(f"  running {name}: {' '.join(shlex.quote(str(a)) for a in argv)}", flush=True)
    t0 = time.time()
    with open(out_p, "w") as out, open(err_p, "w") as err:
        proc = subprocess.Popen([str(a) for a in argv], stdout=out, stderr=err, cwd=ROOT, env=child_env())
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.time() - t0 > timeout:
                proc.send_signal(signal.SIGKILL)
                _, status, ru = os.wait4(proc.pid, 0)
                raise Failed(f"{name}: timed out after {timeout} s (logs: {out_p}, {err_p})")
            time.sleep(0.2)
    proc.returncode = os.waitstatus_to_exitcode(status)
    secs = time.time() - t0
    stdout = out_p.read_text()
    if proc.returncode != 0:
        tail = "".join(err_p.read_text().splitlines(keepends=True)[-15:])
        raise Failed(f"{name}: exit status {proc.returncode} after {secs:.0f} s; stderr tail:\n{tail}")
    # ru_maxrss is in KiB on Linux: the child's own high-water mark, whatever it reports itself.
    return stdout, ru.ru_maxrss * 1024, secs


def last_json(text, name):
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{") or line.startswith("["):
            return json.loads(line)
    raise Failed(f"{name}: no JSON line in its output")


def machine():
    model = platform.processor() or "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    load = os.getloadavg()
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "mem_gib": round(mem / GiB, 1),
        "loadavg": [round(x, 2) for x in load],
        "threads": THREADS,
    }


def git_rev():
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def build():
    """Builds the trainer and bench_kernels, then copies them aside (a shared target folder's
    uplifted binaries can be replaced by another checkout's build while we run)."""
    if os.environ.get("BENCH_BIN_DIR"):
        d = Path(os.environ["BENCH_BIN_DIR"])
        return d / "qlora-cls", d / "bench_kernels"
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    bins = CACHE / "bin"
    bins.mkdir(parents=True, exist_ok=True)
    if os.environ.get("BENCH_NO_BUILD") != "1":
        extra = shlex.split(os.environ.get("BENCH_CARGO_ARGS", ""))
        cmd = ["cargo", "build", "--release", "--bin", "qlora-cls", "--example", "bench_kernels", *extra]
        print("building:", " ".join(cmd), flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True)
    found = []
    for src in (target / "release" / "qlora-cls", target / "release" / "examples" / "bench_kernels"):
        if src.is_file():
            shutil.copy2(src, bins / src.name)
            found.append(bins / src.name)
        elif os.environ.get("BENCH_NO_BUILD") == "1":
            # Reference figures alone are still worth having (e.g. while the build is broken).
            print(f"warning: {src} is missing: our side of the rows that need it is skipped", flush=True)
            found.append(None)
        else:
            raise SystemExit(f"{src} is missing after the build")
    return found[0], found[1]


def med(xs):
    return statistics.median(xs)


# ---------------------------------------------------------------------------------------------
# Rows 1 and 2: kernels


def kernel_rows(bench_kernels, table, kernel_csv, raw):
    modes = [m for m, row in (("nf4", 1), ("adamw", 2)) if row in ROWS]
    for mode in modes:
        ours_argv = [bench_kernels, mode, "--threads", THREADS]
        ref_argv = [PY, BENCH / "ref_kernels.py", mode, "--threads", THREADS]
        if mode == "nf4":
            ours_argv += ["--reps", KREPS]
            ref_argv += ["--reps", KREPS]
        res = {}
        for who, argv in (("ours", ours_argv), ("reference", ref_argv)):
            if argv[0] is None:
                res[who] = None
                continue
            try:
                out, _, _ = run_child(f"{mode}-{who}", argv, timeout=900)
                res[who] = last_json(out, f"{mode}-{who}")
            except Failed as e:
                print(f"  FAILED: {e}", flush=True)
                res[who] = None
        raw[mode] = res
        for who, r in res.items():
            if r is None:
                continue
            for key in ("quantize_s", "dequantize_s", "dequantize_into_s", "step_s"):
                for i, v in enumerate(r.get(key) or []):
                    kernel_csv.append({"bench": mode, "metric": key, "impl": who, "rep": i, "seconds": v})
        o, f = res.get("ours"), res.get("reference")
        if mode == "nf4":
            for key, label in (("quantize_s", "NF4 quantize 4096x4096 bf16"), ("dequantize_s", "NF4 dequantize to bf16")):
                gbps = lambda r: r["bf16_bytes"] / med(r[key]) / GB if r and r.get(key) else None
                table.append(dict(row=1, metric=label, unit="GB/s", ours=gbps(o), ref=gbps(f), better="higher"))
            if o and o.get("dequantize_into_s"):
                ref_into = gbps_into = None
                if f and f.get("dequantize_into_s"):
                    ref_into = f["bf16_bytes"] / med(f["dequantize_into_s"]) / GB
                gbps_into = o["bf16_bytes"] / med(o["dequantize_into_s"]) / GB
                table.append(
                    dict(row=1, metric="NF4 dequantize into a buffer", unit="GB/s", ours=gbps_into, ref=ref_into,
                         better="higher", note="" if ref_into else "bnb CPU backend has no out= variant")
                )
        else:
            ms = lambda r: med(r["step_s"]) * 1e3 if r else None
            table.append(dict(row=2, metric="AdamW8bit step, 3,416,064 params", unit="ms", ours=ms(o), ref=ms(f), better="lower"))


# ---------------------------------------------------------------------------------------------
# Row 3: training throughput


def mrpc_dir():
    shared = Path(os.environ.get("QLORA_SHARED", ROOT.parent / "shared"))
    d = shared / "data" / "mrpc"
    if not (d / "train.tsv").is_file():
        raise SystemExit(f"MRPC not found at {d} (set QLORA_SHARED to the folder holding data/mrpc)")
    return d


def write_subset(src_dir, dst_dir, n_train, n_dev):
    """GLUE TSV subset: the first n rows of train.tsv / dev.tsv, lines copied verbatim."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
        with open(src_dir / name, encoding="utf-8") as f:
            lines = f.read().splitlines(keepends=True)
        if len(lines) - 1 < n:
            raise SystemExit(f"{src_dir / name} has only {len(lines) - 1} rows, {n} needed")
        tmp = dst_dir / (name + ".tmp")
        tmp.write_text("".join(lines[: n + 1]), encoding="utf-8")
        os.replace(tmp, dst_dir / name)


def make_checkpoint(shape, out, timeout):
    run_child(f"make-checkpoint-{shape}", [PY, BENCH / "make_checkpoint.py", "--shape", shape, "--out", out], timeout)


def ours_train_argv(binary, model, data, results, max_steps, extra=(), dtype="float32", batch=BATCH):
    """`qlora-cls train` on configs/mrpc.yaml; `dtype` None passes no --bnb_4bit_compute_dtype
    (the configuration's own: auto)."""
    return [
        binary, "train", "--config", ROOT / "configs" / "mrpc.yaml",
        "--model_dir", model, "--tokenizer_dir", model, "--data_dir", data,
        "--results_path", results, "--max_steps", max_steps, "--epochs", 1,
        "--eval_before_training", "false", *(("--bnb_4bit_compute_dtype", dtype) if dtype else ()),
        "--device", "cpu", "--batch_size", batch, "--eval_batch_size", batch,
        "--prompt", "perfect", "--seed", SEED, "--log_every", 1, "--train_splits", "train",
        "--eval_split", "validation", *extra,
    ]


def ours_run_mode(summary):
    """(the fraction of decoder layers recomputed in the backward, compute dtype) the run used,
    as its summary.json reports them (0: activations kept, 1: every layer recomputed)."""
    plan = summary["memory_plan"]
    if plan.get("layers"):
        recomputed = min(plan["recompute_layers"], plan["layers"]) / plan["layers"]
    else:
        recomputed = float(bool(plan["recompute"]))
    return recomputed, str(summary["compute_dtype"])


def ours_matmul_dtype(summary):
    """The type our frozen matmuls multiplied in (fp32 for bf16 on a CPU without bf16 matrix
    instructions), for row 6's peak; older summaries: the compute dtype."""
    return str(summary.get("matmul_dtype") or summary["compute_dtype"])


def ours_peak_estimate(summary):
    """gradient_checkpointing's estimate of the run's peak, for the plan it chose."""
    plan = summary["memory_plan"]
    if "peak_bytes" in plan:
        return plan["peak_bytes"]
    return plan["peak_recompute_bytes" if plan["recompute"] else "peak_keep_bytes"]


def ours_train_once(binary, name, argv, run_dir, warmup, steps):
    """Runs one training process; its timed steps from metrics.csv as a result dict."""
    if binary is None:
        raise Failed("no qlora-cls binary")
    shutil.rmtree(run_dir, ignore_errors=True)
    _, rss, secs = run_child(name, argv, 3600)
    per_step = ours_steps(run_dir)
    if len(per_step) != warmup + steps:
        raise Failed(f"{name}: metrics.csv has {len(per_step)} steps, {warmup + steps} expected")
    timed = per_step[warmup:]
    summary = json.loads((run_dir / "summary.json").read_text())
    gc, dtype = ours_run_mode(summary)
    # metrics.csv rounds tokens_per_s to 0.1, so the tokens of step k (a difference of
    # tokens_per_s x elapsed_s) are known to +-0.05 x (elapsed_k + elapsed_k-1): on a slow
    # step that is a few tokens.
    with open(run_dir / "metrics.csv") as f:
        elapsed = [0.0] + [float(r["elapsed_s"]) for r in csv.DictReader(f)]
    tokens_err = sum(0.05 * (elapsed[k + 1] + elapsed[k]) for k in range(warmup, warmup + steps))
    return dict(
        tokens_per_s=sum(t for _, t in timed) / sum(s for s, _ in timed),
        median_step_s=med([s for s, _ in timed]),
        tokens=round(sum(t for _, t in timed)),
        tokens_err=tokens_err,
        peak_rss_bytes=rss,
        self_reported_peak=summary.get("peak_mem_bytes"),
        wall_s=secs,
        gradient_checkpointing=gc,
        compute_dtype=dtype,
        matmul_dtype=ours_matmul_dtype(summary),
        peak_estimate_bytes=ours_peak_estimate(summary),
    )


def reference_train_once(name, model, data, order, warmup, steps, batch, out_json, extra=()):
    _, rss, secs = run_child(
        name,
        [PY, BENCH / "reference_qlora.py", "--model_dir", model, "--data_dir", data, "--order", order,
         "--warmup", warmup, "--steps", steps, "--threads", THREADS, "--batch_size", batch,
         "--seed", SEED, "--out", out_json, *extra],
        3600,
    )
    r = json.loads(out_json.read_text())
    return dict(
        tokens_per_s=r["tokens_per_s"],
        median_step_s=r["median_step_s"],
        tokens=sum(r["tokens"]),
        peak_rss_bytes=rss,
        self_reported_peak=r.get("peak_rss_bytes"),
        wall_s=secs,
        gradient_checkpointing=r.get("gradient_checkpointing", True),
        compute_dtype=r.get("compute_dtype", "float32"),
    )


def batch_order_file(bench_kernels, n, batch, path):
    """The batches our trainer draws (epoch 1), for the reference to feed the same rows."""
    if bench_kernels:
        out, _, _ = run_child(f"order-{n}-{batch}", [bench_kernels, "order", "--n", n, "--batch", batch, "--seed", SEED,
                                                    "--epoch", 1])
        path.write_text(json.dumps(last_json(out, "order")))
    else:
        print("warning: no bench_kernels: the reference takes the rows in file order", flush=True)
        path.write_text(json.dumps([list(range(i, min(i + batch, n))) for i in range(0, n, batch)]))


def ours_steps(run_dir):
    """Per-step (seconds, tokens) from metrics.csv: elapsed_s is cumulative and tokens_per_s
    is cumulative tokens / elapsed, so tokens up to step k = tokens_per_s_k * elapsed_k."""
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    prev_t, prev_tok, out = 0.0, 0.0, []
    for r in rows:
        t = float(r["elapsed_s"])
        tok = float(r["tokens_per_s"]) * t
        out.append((t - prev_t, tok - prev_tok))
        prev_t, prev_tok = t, tok
    return out


# Row 3's variants: (side, compute dtype flag or None for the configuration's own, extra flags).
TRAIN_RUNS = {
    "ours": ("ours", "float32", ()),
    "reference": ("reference", "float32", ()),
    "ours_bf16": ("ours", "bfloat16", ()),
    "reference_bf16": ("reference", "bfloat16", ()),
    "ours_gc": ("ours", "float32", ("--gradient_checkpointing", "true")),
    "ours_default": ("ours", None, ()),
    # Row 3d: the LoRA options people set, against the same options in PEFT (fp32 compute,
    # recomputing on both sides, so that only the adapter differs from row 3b).
    "ours_all_linear_r16": ("ours", "float32", ("--gradient_checkpointing", "true", "--target_modules", "all-linear",
                                                "--r", 16, "--lora_alpha", 32)),
    "reference_all_linear_r16": ("reference", "float32", ("--target_modules", "all-linear", "--r", 16,
                                                          "--lora_alpha", 32)),
    "ours_dora": ("ours", "float32", ("--gradient_checkpointing", "true", "--use_dora", "true")),
    "reference_dora": ("reference", "float32", ("--use_dora",)),
}


def train_row(binary, bench_kernels, table, train_csv, raw):
    unknown = [v for v in TRAIN_VARIANTS if v not in TRAIN_RUNS]
    if unknown:
        raise Failed(f"BENCH_TRAIN_VARIANTS: unknown {', '.join(unknown)} (known: {', '.join(TRAIN_RUNS)})")
    model = CACHE / "smol"
    make_checkpoint("smol", model, 1800)
    n_train = (WARMUP + STEPS) * BATCH
    data = CACHE / f"mrpc-{n_train}"
    write_subset(mrpc_dir(), data, n_train, BATCH)
    order = CACHE / f"order-{n_train}.json"
    batch_order_file(bench_kernels, n_train, BATCH, order)

    # Ours: fp32 and bf16 compute in the default configuration (`gradient_checkpointing:
    # auto`), fp32 with `gradient_checkpointing: true` (recomputing as the reference does),
    # and with no compute-dtype flag at all (the configuration's `auto`). The reference: fp32
    # and bf16 compute, with recomputation (its setting).
    results = {v: [] for v in TRAIN_VARIANTS}
    for rep in range(1, REPS + 1):
        # Alternating, so that a change in the machine's load hits both sides alike.
        for who in TRAIN_VARIANTS:
            side, dtype, extra = TRAIN_RUNS[who]
            try:
                if side == "ours":
                    run_dir = RESULTS / "runs" / f"{who}-{rep}"
                    argv = ours_train_argv(binary, model, data, run_dir, WARMUP + STEPS, extra, dtype=dtype)
                    r = ours_train_once(binary, f"train-{who}-{rep}", argv, run_dir, WARMUP, STEPS)
                else:
                    out_json = RESULTS / "runs" / f"{who}-{rep}.json"
                    r = reference_train_once(f"train-{who}-{rep}", model, data, order, WARMUP, STEPS, BATCH, out_json,
                                             ("--compute_dtype", dtype, *extra))
                results[who].append(dict(rep=rep, **r))
            except (Failed, OSError, KeyError, ValueError) as e:
                print(f"  FAILED: {e}", flush=True)
    raw["train"] = results
    for who, rs in results.items():
        for r in rs:
            train_csv.append({"impl": who, **r})

    def agg(who, key):
        xs = [r[key] for r in results.get(who, []) if r.get(key) is not None]
        return med(xs) if xs else None

    # What row 6 needs: tokens/s, recomputation and compute dtype per variant, tokens per row.
    last = {"time": time.strftime("%Y-%m-%d %H:%M"), "steps": STEPS, "batch": BATCH, "variants": {}}
    for who, rs in results.items():
        if rs:
            last["variants"][who] = dict(tokens_per_s=agg(who, "tokens_per_s"), tokens=agg(who, "tokens"),
                                         gradient_checkpointing=rs[0]["gradient_checkpointing"],
                                         compute_dtype=rs[0]["compute_dtype"],
                                         matmul_dtype=rs[0].get("matmul_dtype", rs[0]["compute_dtype"]))
    if last["variants"]:
        (RESULTS / "train-last.json").write_text(json.dumps(last, indent=2))
    raw["train_last"] = last

    def count_note(ours, ref, same):
        ot, rt = agg(ours, "tokens"), agg(ref, "tokens")
        if ot and rt and abs(ot - rt) > 0.01 * rt:
            return f"token counts differ: ours {ot:.0f}, reference {rt:.0f}"
        return same if ot and rt else ""

    def rows(row, label, ours, ref, note, single=False):
        if ours not in results:
            return  # a variant left out by BENCH_TRAIN_VARIANTS is not a failure
        table.append(dict(row=row, metric=label, unit="tokens/s", ours=agg(ours, "tokens_per_s"),
                          ref=agg(ref, "tokens_per_s"), better="higher", note=note, single=single))
        table.append(dict(row=row, metric="  median step time", unit="s",
                          ours=agg(ours, "median_step_s"), ref=agg(ref, "median_step_s"), better="lower",
                          single=single))
        table.append(dict(row=row, metric="  peak resident memory (VmHWM)", unit="GiB",
                          ours=div(agg(ours, "peak_rss_bytes"), GiB), ref=div(agg(ref, "peak_rss_bytes"), GiB),
                          better="lower", single=single))

    same = f"{agg('reference', 'tokens') or agg('reference_bf16', 'tokens') or 0:.0f} tokens in {STEPS} timed steps on both sides"
    rows(3, f"QLoRA train, SmolLM2-135M shape, batch {BATCH}, fp32 compute", "ours", "reference",
         count_note("ours", "reference", same))
    rows("3", f"QLoRA train, same, bf16 compute", "ours_bf16", "reference_bf16",
         count_note("ours_bf16", "reference_bf16", "bf16 compute on both sides"))
    rows("3b", "  ours with gradient_checkpointing true, fp32", "ours_gc", "reference",
         count_note("ours_gc", "reference", "recomputing on both sides"))
    for who, label in (("ours", "fp32"), ("ours_bf16", "bf16"), ("ours_gc", "fp32, recomputing")):
        est, got = agg(who, "peak_estimate_bytes"), agg(who, "peak_rss_bytes")
        if est is None or not got:
            continue
        within = abs(est - got) <= 0.15 * got
        table.append(dict(row="3m", metric=f"  our estimated / measured peak, {label}", unit="GiB",
                          ours=est / GiB, ref=got / GiB, better="-", single=False,
                          note=f"gradient_checkpointing's estimate {'within' if within else 'NOT within'} 15% of the measured VmHWM"))
    rows("3d", "  all-linear, r 16, alpha 32, fp32, recomputing", "ours_all_linear_r16", "reference_all_linear_r16",
         count_note("ours_all_linear_r16", "reference_all_linear_r16", "PEFT's all-linear on both sides"))
    rows("3d", "  q,v r 8 with DoRA (QDoRA), fp32, recomputing", "ours_dora", "reference_dora",
         count_note("ours_dora", "reference_dora", "use_dora on both sides; against row 3b without it"))
    dflt = (results.get("ours_default") or [{}])[0].get("compute_dtype", "?")
    rows("3c", f"  ours, default config (no compute-dtype flag: {dflt})", "ours_default",
         "reference_bf16" if dflt == "bfloat16" else "reference",
         count_note("ours_default", "reference_bf16" if dflt == "bfloat16" else "reference",
                    f"reference at the same dtype ({dflt})"))


def div(x, d):
    return None if x is None else x / d


# ---------------------------------------------------------------------------------------------
# Row 4: loading an 8B-shaped checkpoint


def load_row(binary, table, raw):
    model = CACHE / "llama8b"
    stamp = model / ".complete"
    if not stamp.is_file():
        free = shutil.disk_usage(CACHE).free
        if free < 18 * GB:
            raise Failed(f"row 4 needs ~16.1 GB free under {CACHE}, only {free / GB:.1f} GB")
    make_checkpoint("8b", model, 3600)
    data = CACHE / "mrpc-tiny"
    write_subset(mrpc_dir(), data, BATCH, BATCH)
    run_dir = RESULTS / "runs" / "load-8b-ours"
    shutil.rmtree(run_dir, ignore_errors=True)
    res = {}
    try:
        if binary is None:
            raise Failed("no qlora-cls binary")
        # bf16 compute, as on a GPU: the embeddings and norms stay in 16 bits.
        argv = ours_train_argv(binary, model, data, run_dir, 0, dtype="bfloat16")
        _, rss, secs = run_child("load-8b-ours", argv, 3600)
        res["ours"] = dict(peak_rss_bytes=rss, wall_s=secs)
        # One training step at batch 8 on the real MRPC rows: the CPU stand-in for the GPU
        # goal (at most 7 GB for Llama-3-8B at batch 8), with the configuration's
        # gradient checkpointing, in bf16 as on a GPU. Minutes on 2 cores.
        step_dir = RESULTS / "runs" / "step-8b-ours"
        shutil.rmtree(step_dir, ignore_errors=True)
        argv = ours_train_argv(binary, model, data, step_dir, 1, dtype="bfloat16")
        _, rss, secs = run_child("step-8b-ours", argv, 3600)
        steps = ours_steps(step_dir)
        res["ours_step"] = dict(peak_rss_bytes=rss, wall_s=secs, step_s=steps[0][0] if steps else None,
                                tokens=steps[0][1] if steps else None)
    except (Failed, OSError, ValueError) as e:
        print(f"  FAILED: {e}", flush=True)
    if os.environ.get("BENCH_8B_REF", "1") == "1":
        out_json = RESULTS / "runs" / "load-8b-reference.json"
        try:
            _, rss, secs = run_child(
                "load-8b-reference",
                [PY, BENCH / "reference_qlora.py", "--model_dir", model, "--load_only", "--threads", THREADS, "--out", out_json],
                5400,
            )
            res["reference"] = dict(peak_rss_bytes=rss, wall_s=secs)
        except Failed as e:
            print(f"  FAILED: {e}", flush=True)
    raw["load8b"] = res
    o, f = res.get("ours"), res.get("reference")
    verdict = []
    if o:
        verdict.append("PASS: < 7 GB" if o["peak_rss_bytes"] < LOAD_LIMIT_8B else "FAIL: limit is 7 GB")
        if o["peak_rss_bytes"] >= LOAD_LIMIT_8B:
            raw["limit_failed"] = f"row 4: our 8B load peaked at {o['peak_rss_bytes'] / GB:.1f} GB, limit 7 GB"
    if "reference" not in res and os.environ.get("BENCH_8B_REF", "1") != "1":
        verdict.append("reference skipped (BENCH_8B_REF=0)")
    verdict = "; ".join(verdict)
    table.append(dict(row=4, metric="Load Llama-3-8B shape in NF4: peak RSS", unit="GB",
                      ours=div(o and o["peak_rss_bytes"], GB), ref=div(f and f["peak_rss_bytes"], GB),
                      better="lower", note=verdict))
    table.append(dict(row=4, metric="  load wall time", unit="s", ours=o and o["wall_s"], ref=f and f["wall_s"], better="lower"))
    st = res.get("ours_step")
    if st:
        ok = st["peak_rss_bytes"] < LOAD_LIMIT_8B
        tokens = f"{st['tokens']:.0f} tokens, step {st['step_s']:.0f} s" if st.get("tokens") else "no step timing"
        table.append(dict(row="4b", metric="  + one training step, batch 8, bf16", unit="GB",
                          ours=div(st["peak_rss_bytes"], GB), ref=None, better="lower",
                          note=("PASS" if ok else "FAIL") + f": < 7 GB (CPU stand-in for the GPU goal); {tokens}; "
                               "reference skipped (bitsandbytes takes 10+ min to quantize 8B here)"))


# ---------------------------------------------------------------------------------------------


def mrpc_pairs(n):
    """The first n (sentence 1, sentence 2) pairs of MRPC dev.tsv."""
    with open(mrpc_dir() / "dev.tsv", encoding="utf-8") as f:
        rows = [ln.rstrip("\n").split("\t") for ln in f.read().splitlines(keepends=True)[1:]]
    return [[r[3], r[4]] for r in rows[:n]]


def serve_ours(binary, model, adapter, clients, n, pairs_file, name):
    """Starts `qlora-cls serve` on a free port, drives it with serve_client.py, stops it."""
    logs = RESULTS / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    argv = [str(a) for a in (binary, "serve", "--model_dir", model, "--adapter", adapter, "--port", 0,
                             "--prompt", "perfect", "--device", "cpu", "--bnb_4bit_compute_dtype", "float32",
                             "--max_queue", 100000)]
    print(f"  running {name}: {' '.join(shlex.quote(a) for a in argv)}", flush=True)
    with open(logs / f"{name}.err", "w") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, cwd=ROOT, env=child_env(), text=True)
        try:
            addr = None
            for line in proc.stdout:
                if line.startswith("listening on http://"):
                    addr = line.strip()[len("listening on http://"):]
                    break
            if addr is None:
                raise Failed(f"{name}: the server exited before listening (log: {logs / (name + '.err')})")
            out, _, _ = run_child(name + "-client", [PY, BENCH / "serve_client.py", "--addr", addr,
                                                     "--concurrency", clients, "--requests", n, "--pairs", pairs_file])
            return last_json(out, name)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()


_ONE_STEP = {}


def one_step_adapter(binary):
    """(the SmolLM2-shaped checkpoint, an adapter trained one step on 8 MRPC rows): what rows 5
    and 8 serve and score, trained once per bench run."""
    if binary is None:
        raise Failed("no qlora-cls binary")
    if "adapter" not in _ONE_STEP:
        model = CACHE / "smol"
        make_checkpoint("smol", model, 1800)
        data = CACHE / "mrpc-serve"
        write_subset(mrpc_dir(), data, BATCH, BATCH)
        run_dir = RESULTS / "runs" / "one-step-adapter"
        shutil.rmtree(run_dir, ignore_errors=True)
        run_child("one-step-adapter", ours_train_argv(binary, model, data, run_dir, 1))
        _ONE_STEP.update(model=model, adapter=run_dir / "adapter")
    return _ONE_STEP["model"], _ONE_STEP["adapter"]


def serve_row(binary, table, raw):
    model, adapter = one_step_adapter(binary)
    merged = CACHE / "smol-merged"
    run_child("serve-merge", [binary, "merge", "--model_dir", model, "--adapter", adapter, "--out", merged,
                              "--dtype", "float32", "--force", "--bnb_4bit_compute_dtype", "float32"])
    pairs_file = CACHE / "serve-pairs.json"
    pairs_file.write_text(json.dumps(mrpc_pairs(256)))
    res = {}
    for c in SERVE_CLIENTS:
        n = max(64, 4 * c)
        r = {}
        try:
            r["ours"] = serve_ours(binary, model, adapter, c, n, pairs_file, f"serve-ours-{c}")
        except Failed as e:
            print(f"  FAILED: {e}", flush=True)
        try:
            out, _, _ = run_child(f"serve-reference-{c}", [PY, BENCH / "reference_serve.py", "--model_dir", merged,
                                                           "--concurrency", c, "--requests", n, "--pairs", pairs_file,
                                                           "--threads", THREADS])
            r["reference"] = last_json(out, f"serve-reference-{c}")
        except Failed as e:
            print(f"  FAILED: {e}", flush=True)
        res[c] = r
        o, f = r.get("ours") or {}, r.get("reference") or {}
        note = (f"{n} requests of one MRPC pair; ours: serve's defaults on the NF4 base + adapter (weights "
                "dequantised once, LoRA folded in fp32), dynamic batching; "
                "reference: pipeline on the merged fp32 checkpoint, one batch of C at a time")
        table.append(dict(row=5, metric=f"Serve /predict, {c} client(s): requests/s", unit="req/s",
                          ours=o.get("rps"), ref=f.get("rps"), better="higher", note=note if c == SERVE_CLIENTS[0] else ""))
        table.append(dict(row=5, metric="  p50 latency", unit="ms", ours=o.get("p50_ms"), ref=f.get("p50_ms"), better="lower"))
        table.append(dict(row=5, metric="  p99 latency", unit="ms", ours=o.get("p99_ms"), ref=f.get("p99_ms"), better="lower"))
    raw["serve"] = res


# ---------------------------------------------------------------------------------------------
# Row 6: the machine's matmul peak for the row-3 layer shapes, and row 3 as a fraction of it


def smol_shape():
    """The SmolLM2-135M shape of row 3, from the checkpoint's config.json."""
    model = CACHE / "smol"
    make_checkpoint("smol", model, 1800)
    c = json.loads((model / "config.json").read_text())
    heads = c["num_attention_heads"]
    return dict(hidden=c["hidden_size"], intermediate=c["intermediate_size"], heads=heads,
                kv_heads=c.get("num_key_value_heads", heads), head_dim=c.get("head_dim") or c["hidden_size"] // heads,
                layers=c["num_hidden_layers"])


def train_flops_per_token(shape, gc, seq, r=8, targets=("q_proj", "v_proj"), classes=2):
    """FLOPs one QLoRA training step spends per token (bench/README.md, row 6). The frozen
    projections: forward 2*P, the input-gradient backward 2*P (no weight gradient), and a
    second forward 2*P when gradient checkpointing recomputes the layer. LoRA (A [r, in],
    B [out, r]): 2*r*(in+out) per pass, the backward twice that (input and weight gradients).
    Attention scores and the weighted sum: 4*seq*heads*head_dim per layer forward, the backward
    twice that. The head: 2*hidden*classes forward, twice that backward (on every token: the
    logits are computed for all positions). Norms, rotary, softmax, the loss and the optimizer
    are left out (O(hidden) per token)."""
    h, i, L = shape["hidden"], shape["intermediate"], shape["layers"]
    q, kv = shape["heads"] * shape["head_dim"], shape["kv_heads"] * shape["head_dim"]
    proj = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    p_linear = L * sum(a * b for a, b in proj.values())
    p_lora = L * sum(r * (proj[t][0] + proj[t][1]) for t in targets)
    attn = L * 4 * seq * q
    head = 2 * h * classes
    # Forward passes of the decoder layers: one, plus the recomputed share of the layers
    # (gc: the fraction of layers recomputed, or a bool for all or none).
    fwd = 1 + float(gc)
    total = fwd * 2 * p_linear + 2 * p_linear
    total += fwd * 2 * p_lora + 4 * p_lora
    total += fwd * attn + 2 * attn
    total += 3 * head
    return total, p_linear


def gemm_row(bench_kernels, table, raw):
    shape = smol_shape()
    if bench_kernels is None:
        raise Failed("no bench_kernels binary: no matmul peak")
    argv = [bench_kernels, "gemm", "--m", GEMM_M, "--threads", THREADS, "--reps", KREPS, "--dtypes", "float32,bfloat16"]
    for k in ("hidden", "intermediate", "heads", "kv_heads", "head_dim"):
        argv += [f"--{k}", shape[k]]
    out, _, _ = run_child("gemm", argv, 900)
    g = last_json(out, "gemm")
    raw["gemm"] = g
    peak = {d: v["gflops"] * 1e9 for d, v in g["dtypes"].items()}
    for d, short in (("float32", "fp32"), ("bfloat16", "bf16")):
        if d in peak:
            table.append(dict(row=6, metric=f"matmul peak (GFLOP/s), {short}", unit="GFLOP/s", ours=peak[d] / 1e9,
                              ref=None, better="higher", single=True,
                              note=(f"x[{g['m']}, in] . W[out, in]^T over one layer's 7 projections, "
                                    f"{THREADS} threads; the machine's, for both sides" if short == "fp32" else "")))
    # Row 3's tokens/s: from this run, else from the last run that had row 3.
    last = raw.get("train_last")
    src = "this run"
    if not (last and last.get("variants")):
        try:
            last = json.loads((RESULTS / "train-last.json").read_text())
            src = f"row 3 of the run at {last.get('time', '?')}"
        except (OSError, ValueError):
            last = None
    if not last or not last.get("variants"):
        table.append(dict(row=6, metric="  training at % of matmul peak", unit="%", ours=None, ref=None,
                          better="higher", single=True, note="row 3 skipped: no tokens/s to compare (BENCH_ROWS=3,6)"))
        return
    v = last["variants"]
    rows_per_step = last["batch"] * last["steps"]

    def frac(who):
        x = v.get(who)
        if not x or not x.get("tokens_per_s"):
            return None, None
        seq = (x.get("tokens") or 0) / rows_per_step or GEMM_M / BATCH
        flops, _ = train_flops_per_token(shape, x["gradient_checkpointing"], seq)
        # The peak of the type the matmuls ran in (ours multiplies bf16 in fp32 where the
        # CPU has no bf16 matrix instructions; the reference's torch does not).
        d = x.get("matmul_dtype") or x.get("compute_dtype", "float32")
        if d not in peak:
            return None, flops
        return 100 * flops * x["tokens_per_s"] / peak[d], flops

    def widened(x):
        if x and x.get("matmul_dtype") and x["matmul_dtype"] != x.get("compute_dtype"):
            return f"; ours' {x['compute_dtype']} matmuls ran in {x['matmul_dtype']}: against that peak"
        return ""

    for label, ours, ref in (("fp32", "ours", "reference"), ("bf16", "ours_bf16", "reference_bf16"),
                             ("fp32, ours recomputing too", "ours_gc", "reference"),
                             ("ours default config", "ours_default", "reference")):
        if ours == "ours_default" and v.get(ours):
            # Against the reference at the dtype our configuration resolved to.
            label += f" ({v[ours].get('compute_dtype')})"
            if v[ours].get("compute_dtype") == "bfloat16":
                ref = "reference_bf16"
        (fo, flo), (fr, flr) = frac(ours), frac(ref)
        if fo is None and (fr is None or ours not in v):
            continue
        share = float(v.get(ours, {}).get("gradient_checkpointing") or 0)
        recompute = ("no recompute" if share == 0 else "recompute counted" if share == 1
                     else f"recompute of {share:.0%} of the layers counted")
        table.append(dict(row=6, metric=f"  ours / ref training at % of matmul peak, {label}", unit="%",
                          ours=fo, ref=fr, better="higher",
                          note=(f"training FLOPs/token ours {fmt(flo and flo / 1e6)} M ({recompute}), "
                                f"ref {fmt(flr and flr / 1e6)} M (recompute counted); tokens/s from {src}"
                                + widened(v.get(ours)))))


# ---------------------------------------------------------------------------------------------
# Row 7: how cost grows with the sequence length and the batch size


def write_long_rows(dst, n, seq):
    """A GLUE TSV folder whose n train rows are long: sentence 1 and sentence 2 each join enough
    consecutive MRPC train sentences that the rendered text is well over `seq` tokens, so that
    truncation to `max_length seq` leaves every row exactly seq tokens."""
    with open(mrpc_dir() / "train.tsv", encoding="utf-8") as f:
        src = [ln.rstrip("\n").split("\t") for ln in f.read().splitlines(keepends=True)[1:]]
    src = [r for r in src if len(r) >= 5]
    k = max(4, -(-seq // 20))  # ~25 tokens per sentence: 2k sentences are ~2.5 x seq tokens
    lines = ["Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"]
    for j in range(n):
        pick = [src[(j * k + t) % len(src)] for t in range(k)]
        s1 = " ".join(r[3] for r in pick)
        s2 = " ".join(r[4] for r in pick)
        lines.append(f"{pick[0][0]}\t{j}\t{j}\t{s1}\t{s2}\n")
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "train.tsv").write_text("".join(lines), encoding="utf-8")
    # The evaluation our run ends with (outside the timed steps): two short MRPC dev rows.
    with open(mrpc_dir() / "dev.tsv", encoding="utf-8") as f:
        (dst / "dev.tsv").write_text("".join(f.read().splitlines(keepends=True)[:3]), encoding="utf-8")


def scaling_row(binary, bench_kernels, table, raw):
    model = CACHE / "smol"
    make_checkpoint("smol", model, 1800)
    w, st = SCALING_WARMUP, SCALING_STEPS
    points, res = [], {}
    for seq, batch in SCALING:
        n = (w + st) * batch
        data = CACHE / f"long-{seq}-{n}"
        write_long_rows(data, n, seq)
        order = CACHE / f"order-{n}-{batch}.json"
        batch_order_file(bench_kernels, n, batch, order)
        got = {"ours": [], "reference": []}
        for rep in range(1, SCALING_REPS + 1):
            tag = f"{seq}x{batch}-{rep}"
            try:
                run_dir = RESULTS / "runs" / f"scaling-ours-{tag}"
                argv = ours_train_argv(binary, model, data, run_dir, w + st, ("--max_length", seq), batch=batch)
                got["ours"].append(ours_train_once(binary, f"scaling-ours-{tag}", argv, run_dir, w, st))
            except (Failed, OSError, KeyError, ValueError) as e:
                print(f"  FAILED: {e}", flush=True)
            try:
                out_json = RESULTS / "runs" / f"scaling-reference-{tag}.json"
                got["reference"].append(reference_train_once(
                    f"scaling-reference-{tag}", model, data, order, w, st, batch, out_json,
                    ("--max_length", seq, "--compute_dtype", "float32")))
            except (Failed, OSError, KeyError, ValueError) as e:
                print(f"  FAILED: {e}", flush=True)
        if f"{seq}x{batch}" in SCALING_CAPPED and got["reference"]:
            # The same memory as the reference: `gradient_checkpointing: auto` recomputes as
            # few layers as keep the estimate under it.
            cap = round(med([r["peak_rss_bytes"] for r in got["reference"]]))
            got["ours_capped"] = []
            for rep in range(1, SCALING_REPS + 1):
                tag = f"{seq}x{batch}-capped-{rep}"
                try:
                    run_dir = RESULTS / "runs" / f"scaling-ours-{tag}"
                    argv = ours_train_argv(binary, model, data, run_dir, w + st,
                                           ("--max_length", seq, "--max_memory", cap), batch=batch)
                    got["ours_capped"].append(ours_train_once(binary, f"scaling-ours-{tag}", argv, run_dir, w, st))
                except (Failed, OSError, KeyError, ValueError) as e:
                    print(f"  FAILED: {e}", flush=True)
        res[f"{seq}x{batch}"] = got
        m = {}
        for who, rs in got.items():
            if rs:
                m[who] = {k: med([r[k] for r in rs]) for k in ("tokens_per_s", "peak_rss_bytes", "tokens",
                                                               "median_step_s")}
                points.append(dict(impl=who, seq=seq, batch=batch, tokens_per_s=m[who]["tokens_per_s"],
                                   peak_rss_bytes=round(m[who]["peak_rss_bytes"]), tokens=round(m[who]["tokens"]),
                                   step_s=m[who]["median_step_s"]))
        o, f = m.get("ours", {}), m.get("reference", {})
        expect = seq * batch * st
        counts = [x.get("tokens") for x in (o, f) if x]
        # Ours' count is tokens_per_s x elapsed_s from metrics.csv, rounded there (tokens_err).
        slack = max(0.01 * expect, med([r["tokens_err"] for r in got["ours"]]) if got["ours"] else 0)
        if any(abs(c - expect) > slack for c in counts):
            note = (f"token counts differ from {seq} x {batch} x {st} = {expect}: ours "
                    f"{fmt(o.get('tokens'))}, reference {fmt(f.get('tokens'))}")
        else:
            note = f"{expect} tokens in {st} timed step(s) on both sides"
            if f and o:
                note += f" (reference exactly {f['tokens']:.0f}, ours {o['tokens']:.0f} +- {slack:.0f} from metrics.csv)"
        table.append(dict(row=7, metric=f"QLoRA train, seq {seq}, batch {batch}, fp32", unit="tokens/s",
                          ours=o.get("tokens_per_s"), ref=f.get("tokens_per_s"), better="higher", note=note))
        table.append(dict(row=7, metric="  peak resident memory (VmHWM)", unit="GiB",
                          ours=div(o.get("peak_rss_bytes"), GiB), ref=div(f.get("peak_rss_bytes"), GiB),
                          better="lower"))
        capped = got.get("ours_capped")
        if capped:
            c = {k: med([r[k] for r in capped]) for k in ("tokens_per_s", "peak_rss_bytes", "peak_estimate_bytes",
                                                          "gradient_checkpointing")}
            share = c["gradient_checkpointing"]
            table.append(dict(row=7, metric=f"  ours with max_memory = the reference's peak, seq {seq}",
                              unit="tokens/s", ours=c["tokens_per_s"], ref=f.get("tokens_per_s"), better="higher",
                              note=(f"auto recomputed {share:.0%} of the layers; estimated peak "
                                    f"{c['peak_estimate_bytes'] / GiB:.2f} GiB, measured {c['peak_rss_bytes'] / GiB:.2f}")))
            table.append(dict(row=7, metric="    peak resident memory (VmHWM)", unit="GiB",
                              ours=div(c["peak_rss_bytes"], GiB), ref=div(f.get("peak_rss_bytes"), GiB),
                              better="lower"))
    raw["scaling"] = res
    if not points:
        raise Failed("row 7: no scaling measurement succeeded")
    csv_path = RESULTS / "scaling.csv"
    write_csv(csv_path, points)
    print(f"  wrote {csv_path}", flush=True)
    if binary is not None:
        out, _, _ = run_child("scaling-plot", [binary, "plot", "--scaling", csv_path, "--out", RESULTS / "plots"])
        for line in out.splitlines():
            if line.startswith("wrote "):
                print(f"  {line}", flush=True)
                raw.setdefault("scaling_plots", []).append(line[len("wrote "):])


# ---------------------------------------------------------------------------------------------
# Row 8: evaluation and prediction throughput


def scored_line(text, name):
    """`scored N rows in S s (R rows/s)`, which our eval and predict print."""
    for line in text.splitlines():
        if line.startswith("scored ") and " rows in " in line:
            parts = line.split()
            return int(parts[1]), float(parts[4])
    raise Failed(f"{name}: no 'scored N rows in S s' line in its output")


def infer_row(binary, table, raw):
    model, adapter = one_step_adapter(binary)
    data = CACHE / f"mrpc-infer-{INFER_ROWS}"
    write_subset(mrpc_dir(), data, BATCH, INFER_ROWS)
    common = ["--adapter", adapter, "--model_dir", model, "--tokenizer_dir", model, "--data_dir", data,
              "--split", "validation", "--eval_batch_size", BATCH, "--device", "cpu",
              "--bnb_4bit_compute_dtype", "float32", "--prompt", "perfect"]
    res = {"eval": [], "predict": [], "reference": []}
    for rep in range(1, INFER_REPS + 1):
        for who in ("eval", "predict"):
            name = f"infer-ours-{who}-{rep}"
            extra = ["--out", RESULTS / "runs" / f"predict-{rep}.csv"] if who == "predict" else []
            try:
                out, rss, secs = run_child(name, [binary, who, *common, *extra], 1800)
                n, s = scored_line(out, name)
                acc = None
                if who == "eval":
                    for tok in out.split():
                        if acc == "next":
                            acc = float(tok)
                            break
                        if tok == "accuracy":
                            acc = "next"
                res[who].append(dict(rows=n, scoring_s=s, rows_per_s=n / s, peak_rss_bytes=rss, wall_s=secs,
                                     accuracy=acc if isinstance(acc, float) else None))
            except (Failed, OSError, ValueError) as e:
                print(f"  FAILED: {e}", flush=True)
        out_json = RESULTS / "runs" / f"infer-reference-{rep}.json"
        try:
            _, rss, secs = run_child(f"infer-reference-{rep}", [
                PY, BENCH / "reference_infer.py", "--model_dir", model, "--adapter", adapter, "--data_dir", data,
                "--split", "dev", "--batch_size", BATCH, "--threads", THREADS, "--compute_dtype", "float32",
                "--out", out_json], 1800)
            r = json.loads(out_json.read_text())
            res["reference"].append(dict(rows=r["rows"], scoring_s=r["scoring_s"], rows_per_s=r["rows_per_s"],
                                         peak_rss_bytes=rss, wall_s=secs, accuracy=r.get("accuracy")))
        except (Failed, OSError, KeyError, ValueError) as e:
            print(f"  FAILED: {e}", flush=True)
    raw["infer"] = res

    def agg(who, key):
        xs = [r[key] for r in res[who] if r.get(key) is not None]
        return med(xs) if xs else None

    acc_o, acc_r = agg("eval", "accuracy"), agg("reference", "accuracy")
    note = (f"{INFER_ROWS} MRPC dev rows, batch {BATCH}, fp32, adapter from one row-3-shaped step; forward passes "
            f"only (load excluded); accuracy ours {fmt(acc_o)}, reference {fmt(acc_r)}")
    table.append(dict(row=8, metric=f"eval, rows/s", unit="rows/s", ours=agg("eval", "rows_per_s"),
                      ref=agg("reference", "rows_per_s"), better="higher", note=note))
    table.append(dict(row=8, metric=f"predict, rows/s", unit="rows/s", ours=agg("predict", "rows_per_s"),
                      ref=agg("reference", "rows_per_s"), better="higher", note="reference: the same scoring loop"))
    table.append(dict(row=8, metric="  eval process wall time, load included", unit="s", ours=agg("eval", "wall_s"),
                      ref=agg("reference", "wall_s"), better="lower"))
    table.append(dict(row=8, metric="  peak resident memory (VmHWM), eval", unit="GiB",
                      ours=div(agg("eval", "peak_rss_bytes"), GiB), ref=div(agg("reference", "peak_rss_bytes"), GiB),
                      better="lower"))


# ---------------------------------------------------------------------------------------------


def fmt(v):
    if v is None:
        return "-"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.3g}" if abs(v) < 1 else f"{v:.2f}"


def print_table(table, info):
    print()
    print(f"qlora-cls benchmarks, {time.strftime('%Y-%m-%d %H:%M')} (git {info['git']})")
    m = info["machine"]
    print(f"machine: {m['nproc']} CPUs ({m['cpu']}), {m['mem_gib']} GiB RAM, load average at start "
          f"{m['loadavg'][0]}; torch threads {THREADS} on both sides")
    print(f"training: {WARMUP} warm-up + {STEPS} timed steps x {REPS} repetitions, medians; kernels: medians of "
          f"{KREPS} (NF4) / 10 (AdamW) repetitions")
    head = ["row", "measurement", "unit", "ours", "reference", "ours/ref", "note"]
    lines = []
    for r in table:
        ratio = r["ours"] / r["ref"] if r.get("ours") and r.get("ref") else None
        better = {"higher": "higher is better", "lower": "lower is better",
                  "-": "ours/ref = estimate / measured"}[r["better"]]
        note = r.get("note") or ""
        lines.append([str(r["row"]), r["metric"], r["unit"], fmt(r.get("ours")), fmt(r.get("ref")),
                      "-" if ratio is None else f"{ratio:.2f}", f"{better}{'; ' + note if note else ''}"])
        r["ratio"] = ratio
    widths = [max(len(x[i]) for x in lines + [head]) for i in range(len(head))]
    align = ["<", "<", "<", ">", ">", ">", "<"]
    for i, ln in enumerate([head] + lines):
        print("  ".join(f"{c:{a}{w}}" for c, a, w in zip(ln, align, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def write_csv(path, rows):
    if not rows:
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def main():
    RESULTS.mkdir(parents=True, exist_ok=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    info = {"machine": machine(), "git": git_rev()}
    binary, bench_kernels = build()
    table, kernel_csv, train_csv, raw = [], [], [], {"info": info}
    t0 = time.time()
    failed = []
    steps = [(lambda: kernel_rows(bench_kernels, table, kernel_csv, raw), ROWS & {1, 2}),
             (lambda: train_row(binary, bench_kernels, table, train_csv, raw), ROWS & {3}),
             (lambda: load_row(binary, table, raw), ROWS & {4}),
             (lambda: serve_row(binary, table, raw), ROWS & {5}),
             (lambda: gemm_row(bench_kernels, table, raw), ROWS & {6}),
             (lambda: scaling_row(binary, bench_kernels, table, raw), ROWS & {7}),
             (lambda: infer_row(binary, table, raw), ROWS & {8})]
    for fn, wanted in steps:
        if not wanted:
            continue
        print(f"row(s) {sorted(wanted)} ...", flush=True)
        try:
            fn()
        except Failed as e:
            print(f"  FAILED: {e}", flush=True)
            failed.append(str(e))
    info["bench_s"] = round(time.time() - t0)
    print_table(table, info)
    write_csv(RESULTS / "summary.csv", table)
    write_csv(RESULTS / "kernels.csv", kernel_csv)
    write_csv(RESULTS / "train.csv", train_csv)
    (RESULTS / "raw.json").write_text(json.dumps(raw, indent=2))
    print(f"\nwrote {RESULTS}/summary.csv, kernels.csv, train.csv, raw.json (logs in {RESULTS}/logs); "
          f"{info['bench_s']} s")
    # A reference figure may be absent by design (bnb's CPU backend has no `out=` dequantize).
    missing = [
        r for r in table
        if r.get("ours") is None or (r.get("ref") is None and not r.get("single") and "out=" not in r.get("note", "")
                                     and "skipped" not in r.get("note", ""))
    ]
    if failed or missing:
        print("some measurements failed: see the logs above", file=sys.stderr)
    if raw.get("limit_failed"):
        print(raw["limit_failed"], file=sys.stderr)
    if failed or missing or raw.get("limit_failed"):
        sys.exit(1)


if __name__ == "__main__":
    main()
