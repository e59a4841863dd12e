"""bitsandbytes 0.50.2 (CPU backend) oracle for tests/nf4.rs.

usage: nf4_oracle.py quantize DIR   reads DIR/cases.json + DIR/inputs.safetensors, writes
                                    DIR/outputs.safetensors and DIR/bnb.safetensors
                                    (+ DIR/bnb_names.json with each case's key order)
       nf4_oracle.py load DIR       reads DIR/ours.safetensors + DIR/load_cases.json (tensors our
                                    to_bnb_tensors wrote), rebuilds bitsandbytes QuantStates from
                                    them and writes their dequantization to DIR/loaded.safetensors
"""
import json
import os
import sys
import warnings

# bitsandbytes wraps its torch fallbacks in torch.compile; compiling every shape would take
# minutes and computes the same f32 products, so run them eagerly.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

warnings.filterwarnings("ignore")
import logging

logging.disable(logging.WARNING)

import torch
from safetensors.torch import load_file, save_file

import bitsandbytes.functional as F
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

KINDS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def own(t):
    return t.detach().clone().contiguous()


def dequant_reference(packed, absmax, blocksize, shape, dtype):
    # bitsandbytes' default (torch) backend: flat blockwise layout, code * absmax in f32,
    # one rounding to dtype. __wrapped__ skips torch.compile; the arithmetic is the same.
    code = F.get_4bit_type("nf4", device="cpu")
    fn = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)
    return fn(packed.reshape(-1), absmax, code, blocksize, shape, dtype)


def quantize(d):
    cases = json.load(open(f"{d}/cases.json"))
    inputs = load_file(f"{d}/inputs.safetensors")
    out, bnb, names = {}, {}, {}
    out["nf4_code"] = own(F.get_4bit_type("nf4", device="cpu"))
    out["dynamic_map"] = own(F.create_dynamic_map(signed=True))
    for case in cases:
        name, bs, dq = case["name"], case["blocksize"], case["double_quant"]
        w = inputs[name]
        q, st = F.quantize_4bit(w, blocksize=bs, compress_statistics=dq, quant_type="nf4")
        out[f"{name}.packed"] = own(q)
        out[f"{name}.absmax"] = own(st.absmax)
        if dq:
            out[f"{name}.nested_absmax"] = own(st.state2.absmax)
            out[f"{name}.nested_code"] = own(st.state2.code)
            out[f"{name}.offset"] = own(st.offset.reshape(1).float())
            absmax = F.dequantize_blockwise(st.absmax, st.state2) + st.offset
        else:
            absmax = st.absmax
        out[f"{name}.absmax_f32"] = own(absmax.float())
        orig = st.dtype
        for kind in case["dequant_kinds"]:
            st.dtype = KINDS[kind]
            out[f"{name}.dq_api.{kind}"] = own(F.dequantize_4bit(q, st))
            out[f"{name}.dq_ref.{kind}"] = own(
                dequant_reference(q, absmax.float(), bs, tuple(w.shape), KINDS[kind])
            )
        st.dtype = orig
        prefix = f"{name}.layer."
        keys = [prefix + "weight"]
        bnb[prefix + "weight"] = own(q)
        for k, v in st.as_dict(packed=True).items():
            bnb[prefix + "weight." + k] = own(v)
            keys.append(prefix + "weight." + k)
        names[name] = keys
    # 8-bit blockwise quantization with the dynamic map, as used for the nested absmax.
    x = inputs["q8.x"]
    q8, st8 = F.quantize_blockwise(x, blocksize=256)
    out["q8.q"] = own(q8)
    out["q8.absmax"] = own(st8.absmax)
    out["q8.code"] = own(st8.code)
    out["q8.dq"] = own(F.dequantize_blockwise(q8, st8))
    save_file(out, f"{d}/outputs.safetensors")
    save_file(bnb, f"{d}/bnb.safetensors")
    json.dump(names, open(f"{d}/bnb_names.json", "w"))


def load(d):
    tensors = load_file(f"{d}/ours.safetensors")
    prefixes = json.load(open(f"{d}/load_cases.json"))
    out = {}
    for prefix in prefixes:
        packed = tensors[prefix + "weight"]
        qs = {
            k[len(prefix + "weight.") :]: v
            for k, v in tensors.items()
            if k.startswith(prefix + "weight.")
        }
        st = F.QuantState.from_dict(qs, device=torch.device("cpu"))
        out[prefix + "dq"] = own(F.dequantize_4bit(packed, st))
        out[prefix + "reference"] = own(
            dequant_reference(
                packed,
                (F.dequantize_blockwise(st.absmax, st.state2) + st.offset).float()
                if st.nested
                else st.absmax,
                st.blocksize,
                tuple(st.shape),
                st.dtype,
            )
        )
    save_file(out, f"{d}/loaded.safetensors")


if __name__ == "__main__":
    mode, d = sys.argv[1], sys.argv[2]
    {"quantize": quantize, "load": load}[mode](d)
    print("ok")
