"""bitsandbytes' 4-bit linear layers as the reference computes them, the same on every CPU.

On a CPU, bitsandbytes 0.50.2 picks its 4-bit kernels by what the host can do:
- with AVX512 (`torch.backends.cpu.get_cpu_capability() == "AVX512"`) `dequantize_4bit` runs a
  native kernel that assumes every block lies inside one row; for a weight whose rows are not a
  multiple of the blocksize (a 64x96 down_proj at blocksize 64) it returns other values than
  its own portable implementation and its CUDA kernel (measured: up to 0.156 per element);
- with AVX512-BF16, `Linear4bit` in eval mode without grad repacks the weight for a bf16 GEMM
  (and asserts on shapes that are not a multiple of 32).
The reference our tests compare with is bitsandbytes' portable math (flat blocks, code * absmax
in fp32, its CUDA kernels' layout), multiplied in fp32: `pin_fp32` makes every `Linear4bit` of a
model compute exactly that, on any CPU, in train and eval mode alike.
"""
import torch

import bitsandbytes as bnb
from bitsandbytes.backends.default.ops import (
    _dequantize_4bit_compute,
    _dequantize_blockwise_compute,
)

# __wrapped__ skips torch.compile where bitsandbytes wraps them; the arithmetic is the same.
_DQ4 = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)
_DQ8 = getattr(_dequantize_blockwise_compute, "__wrapped__", _dequantize_blockwise_compute)


def dequantize(weight):
    """The fp32 weight of a `Params4bit`, by bitsandbytes' portable implementation."""
    qs = weight.quant_state
    absmax = qs.absmax
    if qs.nested:
        s2 = qs.state2
        absmax = _DQ8(absmax.reshape(-1), s2.absmax, s2.code, s2.blocksize, torch.float32)
        absmax = absmax + qs.offset
    code = bnb.functional.get_4bit_type(qs.quant_type, device=weight.device)
    packed = weight.data.view(torch.uint8).reshape(-1)
    return _DQ4(packed, absmax, code, qs.blocksize, qs.shape, torch.float32)


def pin_fp32(model):
    """Every `Linear4bit` of `model` multiplies its dequantised weight in fp32 (returns how
    many there are); gradients still flow to the input, as through bitsandbytes' own op."""
    n = 0
    for mod in model.modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            mod.support_avx512bf16_for_cpu = False
            mod.forward = _fp32_forward(mod)
            n += 1
    return n


def _fp32_forward(mod):
    def forward(x):
        bias = None if mod.bias is None else mod.bias.float()
        y = torch.nn.functional.linear(x.float(), dequantize(mod.weight), bias)
        return y.to(x.dtype)

    return forward
