"""Low precision: bit-exact NVFP4 / MX formats and the NVFP4 training recipe.

`formats` holds the codecs and quantizers; `NVFP4Linear` and `MXFP8Linear` are nn.Linear
drop-ins whose three GEMMs run on quantized operands (emulated in fp32 on any device).
"""

from nemotron3.quant import formats
from nemotron3.quant.mxfp8_linear import MXFP8Linear, MXFP8Recipe
from nemotron3.quant.nvfp4_linear import NVFP4Linear, NVFP4Recipe
from nemotron3.quant.qlinear import QuantizedLinear

__all__ = ["formats", "NVFP4Linear", "NVFP4Recipe", "MXFP8Linear", "MXFP8Recipe", "QuantizedLinear"]
