"""How base weights are stored in 4 bits: NormalFloat codes, blockwise absmax scales and packed codes as
bitsandbytes stores them (nf4), and the frozen NF4Linear that dequantizes them on the fly, with
quantize_nf4(model) (linear). A property of the base model (from_pretrained(..., quantize="nf4")), which
QLoRA's adapters (peft.lora.quantized) sit on."""

from gpt2lite.quantization.linear import NF4Linear, nf4_layers, quantize_nf4
from gpt2lite.quantization.nf4 import NF4_BLOCK_SIZE, NF4Tensor, dequantize_nf4_tensor, quantize_nf4_tensor

__all__ = ["NF4Linear", "quantize_nf4", "nf4_layers", "NF4Tensor", "quantize_nf4_tensor", "dequantize_nf4_tensor",
           "NF4_BLOCK_SIZE"]
