"""gptforge's native CPU kernels for decoding: the C++ sources (csrc/), their build (build.py), the ops over
them (ops.py), the block op's named parameter schema (schema.py) and the decode layout that swaps them into a
model (layout.py). docs/BENCHMARKS.md has the measurements.

    csrc/gemv.cpp       few-row products over fp32/bf16/fp16/int8/int4 weights  torch.ops.gptforge_gemv
    csrc/attention.cpp  a decode step's cache write and attention               torch.ops.gptforge_attn
    csrc/block.cpp      one Linear of a block by its kind (float, int8/int4 codes, LoRA adapters per row)
    csrc/step.cpp       a block's decode step (schema.py names its inputs)   torch.ops.gptforge_decode
                        and a whole decode step (native/step.py)             torch.ops.gptforge_step
"""

from gptforge.native.build import available, library_path
from gptforge.native.layout import DecodeBlock, DecodeLinear, DecodeTiedHead, decode_layout
from gptforge.native.ops import MAX_ROWS, linear, linear_int4, linear_int8, usable
from gptforge.native.schema import AdaptedLinear, BlockLayout, BlockParams

__all__ = ["available", "library_path", "DecodeBlock", "DecodeLinear", "DecodeTiedHead", "decode_layout", "MAX_ROWS",
           "linear", "linear_int4", "linear_int8", "usable", "AdaptedLinear", "BlockLayout", "BlockParams"]
