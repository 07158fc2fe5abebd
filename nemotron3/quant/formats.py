"""Low-precision number formats, bit-exact: the public face of nemotron3.quant.

    from nemotron3.quant import formats
    q = formats.nvfp4_quantize(x)                          # TE arithmetic (training default)
    q = formats.nvfp4_quantize(x, pts, convention="torchao")
    q.packed, q.scales, q.per_tensor_scale, q.dequantize()
    m = formats.mx_quantize(x, "fp4_e2m1", mode="rceil")
    m.qdata, m.scales, m.dequantize()
    b = formats.mxs_quantize(x, "mx6")                     # shared microexponents: MX9, MX6, MX4
    b.exponents, b.micro, b.codes, b.dequantize()

The implementation is split by concept:
  fp_codecs.py  element codecs: E2M1, E2M3, E3M2, E4M3, E5M2, E8M0; FP4 packing; RNE and
                stochastic rounding
  nvfp4.py      NVFP4 (16-element blocks, E4M3 scale, fp32 per-tensor scale), conventions
                `te` and `torchao`, 2-D 16×16 weight tiles
  mx.py         MXFP8 / MXFP6 / MXFP4 (32-element blocks, E8M0 scale), modes `floor`, `rceil`
  hadamard.py   the 16-point random Hadamard transform of the NVFP4 recipe
  mx_shared.py  MX9 / MX6 / MX4 (16-element blocks, 8-bit shared exponent, 1-bit microexponent
                per pair, sign-magnitude integer mantissas)

Each of those files opens with the numerics: which reference it reproduces bit for bit
(TransformerEngine's kernels for `te`, torchao 0.18 for `torchao` and MX), and why every
rounding step sits where it does. docs/low-precision.md §1-§6 is the spec they follow.
"""

from nemotron3.quant.fp_codecs import (
    ELEMENT_FORMATS,
    ElementFormat,
    decode,
    decode_e8m0,
    element_format,
    element_values,
    encode,
    encode_e8m0,
    pack_fp4,
    random_bytes,
    round_e2m1,
    round_magnitude_,
    round_to_format,
    unpack_fp4,
    values_to_codes,
)
from nemotron3.quant.hadamard import TE_SIGN_VECTOR, hadamard_matrix, inverse_rht, rht
from nemotron3.quant.mx import (
    MX_BLOCK,
    MX_ELEM_DTYPES,
    MX_MODES,
    MXQuantized,
    mx_fake_quantize,
    mx_quantize,
)
from nemotron3.quant.mx_shared import MXS_FORMATS, MXSQuantized, mxs_fake_quantize, mxs_quantize
from nemotron3.quant.nvfp4 import (
    CONVENTIONS,
    NVFP4Quantized,
    nvfp4_fake_quantize,
    nvfp4_quantize,
    te_global_scales,
)

__all__ = [
    "ELEMENT_FORMATS", "ElementFormat", "element_format", "element_values", "encode", "decode",
    "encode_e8m0", "decode_e8m0", "pack_fp4", "unpack_fp4", "round_to_format", "round_e2m1",
    "round_magnitude_", "random_bytes", "values_to_codes", "TE_SIGN_VECTOR", "hadamard_matrix", "rht", "inverse_rht",
    "MX_BLOCK", "MX_ELEM_DTYPES", "MX_MODES", "MXQuantized", "mx_quantize", "mx_fake_quantize",
    "MXS_FORMATS", "MXSQuantized", "mxs_quantize", "mxs_fake_quantize",
    "CONVENTIONS", "NVFP4Quantized", "nvfp4_quantize", "nvfp4_fake_quantize", "te_global_scales",
]
