"""Oracle for tests/optim.rs.

usage: optim_oracle.py adamw8bit|adamw|schedule DIR

adamw8bit / adamw: reads DIR/config.json ({"lrs": [...], "num_params": n, "betas": [b1, b2],
"eps": e, "weight_decay": wd}) and DIR/input.safetensors (p{i}: initial parameters,
g{s}_{i}: gradient of parameter i at step s; a missing key means no gradient, the parameter is
skipped), runs bitsandbytes.optim.AdamW8bit (CPU) or torch.optim.AdamW, and writes after every
step s: s{s}.p{i}, the states s{s}.{i}.<key> (bnb: state1, state2, absmax1, absmax2; torch:
exp_avg, exp_avg_sq) and for 8-bit states the dequantized s{s}.{i}.m_deq / v_deq (bnb's own
dequantize_blockwise). Two runs: DIR/<mode>_ref.safetensors as the libraries run, and
DIR/<mode>_ieee.safetensors with Tensor.sqrt replaced by the correctly rounded float32 square
root (numpy's): torch's CPU sqrt goes through MKL and is not correctly rounded, everything else
is reproduced bit for bit. adamw8bit also writes qmap_signed / qmap_unsigned
(create_dynamic_map).

schedule: reads DIR/schedule.json ({"pairs": [[warmup, total], ...], "ratios": [[total, ratio],
...]}) and writes DIR/schedule_out.json: {"multipliers": [[bits of lambda(0..=total+2) as f64], ...],
"warmup_steps": [...]} from transformers' get_linear_schedule_with_warmup and
TrainingArguments.get_warmup_steps.
"""
import contextlib
import json
import os
import struct
import sys
import warnings

import numpy as np
import torch
from safetensors.torch import load_file, save_file


@contextlib.contextmanager
def ieee_sqrt():
    orig = torch.Tensor.sqrt

    def sqrt(self):
        if self.dtype == torch.float32 and self.device.type == "cpu":
            return torch.from_numpy(np.sqrt(self.detach().contiguous().numpy()))
        return orig(self)

    torch.Tensor.sqrt = sqrt
    try:
        yield
    finally:
        torch.Tensor.sqrt = orig


def run(mode, d, cfg, inp):
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    n = cfg["num_params"]
    params = [torch.nn.Parameter(inp[f"p{i}"].clone()) for i in range(n)]
    kw = dict(lr=cfg["lrs"][0], betas=tuple(cfg["betas"]), eps=cfg["eps"], weight_decay=cfg["weight_decay"])
    if mode == "adamw8bit":
        opt = bnb.optim.AdamW8bit(params, **kw)
    else:
        opt = torch.optim.AdamW(params, **kw)
    out = {}
    for s, lr in enumerate(cfg["lrs"]):
        for group in opt.param_groups:
            group["lr"] = lr
        for i, p in enumerate(params):
            key = f"g{s}_{i}"
            p.grad = inp[key].clone() if key in inp else None
        opt.step()
        for i, p in enumerate(params):
            out[f"s{s}.p{i}"] = p.detach().clone()
            st = opt.state.get(p, {})
            for k in ("state1", "state2", "absmax1", "absmax2", "exp_avg", "exp_avg_sq"):
                if k in st:
                    out[f"s{s}.{i}.{k}"] = st[k].detach().clone().contiguous()
            if mode == "adamw8bit" and "absmax1" in st:
                for k, a, q, name in (("state1", "absmax1", "qmap1", "m_deq"), ("state2", "absmax2", "qmap2", "v_deq")):
                    out[f"s{s}.{i}.{name}"] = F.dequantize_blockwise(
                        st[k], absmax=st[a], code=st[q], blocksize=256
                    ).contiguous()
    if mode == "adamw8bit":
        out["qmap_signed"] = F.create_dynamic_map(signed=True)
        out["qmap_unsigned"] = F.create_dynamic_map(signed=False)
    return out


def optimizer(mode, d):
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    inp = load_file(os.path.join(d, "input.safetensors"))
    save_file(run(mode, d, cfg, inp), os.path.join(d, f"{mode}_ref.safetensors"))
    with ieee_sqrt():
        save_file(run(mode, d, cfg, inp), os.path.join(d, f"{mode}_ieee.safetensors"))


def schedule(d):
    from transformers import TrainingArguments, get_linear_schedule_with_warmup

    with open(os.path.join(d, "schedule.json")) as f:
        cfg = json.load(f)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    mult = []
    for warmup, total in cfg["pairs"]:
        sched = get_linear_schedule_with_warmup(opt, warmup, total)
        # As IEEE bits: JSON float parsers need not round-trip the last bit.
        mult.append([struct.unpack("<Q", struct.pack("<d", float(sched.lr_lambdas[0](k))))[0] for k in range(total + 3)])
    warm = []
    for total, ratio in cfg["ratios"]:
        args = TrainingArguments(output_dir=os.path.join(d, "hf"), warmup_steps=ratio, report_to=[])
        warm.append(args.get_warmup_steps(total))
    with open(os.path.join(d, "schedule_out.json"), "w") as f:
        json.dump({"multipliers": mult, "warmup_steps": warm}, f)


def main():
    warnings.filterwarnings("ignore")
    mode, d = sys.argv[1], sys.argv[2]
    if mode in ("adamw8bit", "adamw"):
        optimizer(mode, d)
    elif mode == "schedule":
        schedule(d)
    else:
        sys.exit(f"unknown mode {mode}")
    print("ok")


if __name__ == "__main__":
    main()
