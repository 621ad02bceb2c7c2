"""4-bit NormalFloat (NF4) storage of base weights (nf4): the codebook, blockwise absmax scales and the packed
codes, as bitsandbytes stores them."""

from gpt2lite.quantization.nf4 import NF4_BLOCK_SIZE, NF4Tensor, dequantize_nf4_tensor, quantize_nf4_tensor

__all__ = ["NF4Tensor", "quantize_nf4_tensor", "dequantize_nf4_tensor", "NF4_BLOCK_SIZE"]
