#!/usr/bin/env python3
"""bitsandbytes' side of rows 1 and 2, with the same workloads as examples/bench_kernels.rs.

    ref_kernels.py nf4   [--rows 4096 --cols 4096 --reps 5 --threads 2 --device cpu]
    ref_kernels.py adamw [--reps 10 --threads 2 --device cpu]

nf4: `bitsandbytes.functional.quantize_4bit(w, blocksize=64, compress_statistics=True,
quant_type="nf4")` on a bf16 normal matrix, then `dequantize_4bit(q, state)` (bf16 out) and
`dequantize_4bit(q, state, out=buf)` (not on the CPU backend: null). adamw: `bnb.optim.AdamW8bit` (lr 3e-4, weight decay
0.01) on the Llama-3-8B LoRA r=8 q/v + head shapes with fixed gradients; the first step
(state allocation) is reported apart. One untimed round first; JSON on stdout.
"""
import argparse
import json
import time


def timed(device, reps, fn):
    import torch

    out = []
    for _ in range(reps):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return out


def lora_8b_shapes():
    r, h, kv = 8, 4096, 1024
    shapes = []
    for _ in range(32):
        shapes += [(r, h), (h, r), (r, h), (kv, r)]
    return shapes + [(2, h)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["nf4", "adamw"])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()

    import torch

    if a.threads > 0:
        torch.set_num_threads(a.threads)
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    torch.manual_seed(0)
    dev = a.device
    if a.mode == "nf4":
        reps = a.reps or 5
        w = torch.randn(a.rows, a.cols, dtype=torch.bfloat16, device=dev)

        def quant():
            return F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")

        q, state = quant()
        buf = F.dequantize_4bit(q, state)
        res = {
            "rows": a.rows,
            "cols": a.cols,
            "numel": w.numel(),
            "bf16_bytes": w.numel() * 2,
            "quantize_s": timed(dev, reps, quant),
            "dequantize_s": timed(dev, reps, lambda: F.dequantize_4bit(q, state)),
        }
        try:
            res["dequantize_into_s"] = timed(dev, reps, lambda: F.dequantize_4bit(q, state, out=buf))
        except (NotImplementedError, RuntimeError):
            # bitsandbytes' CPU backend registers no `dequantize_4bit.out`.
            res["dequantize_into_s"] = None
    else:
        reps = a.reps or 10
        params = [torch.nn.Parameter(torch.randn(s, device=dev) * 0.02) for s in lora_8b_shapes()]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        opt = bnb.optim.AdamW8bit(params, lr=3e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
        first = timed(dev, 1, opt.step)
        res = {
            "params": sum(p.numel() for p in params),
            "tensors": len(params),
            "first_step_s": first[0],
            "step_s": timed(dev, reps, opt.step),
        }
    res["threads"] = torch.get_num_threads()
    res["device"] = dev
    res["bitsandbytes"] = bnb.__version__
    print(json.dumps(res))


if __name__ == "__main__":
    main()
