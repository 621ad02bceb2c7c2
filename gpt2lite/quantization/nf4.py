"""4-bit NormalFloat (NF4) blockwise quantization, as in QLoRA (Dettmers et al., 2023), in pure PyTorch.

A weight is flattened and cut into blocks of 64 values. Each block is scaled by its absolute maximum into
[-1, 1] and every value is replaced by the index (4 bits) of the nearest of 16 levels, the NF4 codebook:
quantiles of a standard normal, so that normally distributed weights fill each level about equally. Two
indices are packed per byte, so a weight costs 0.5 byte plus its block constants.

Double quantization compresses those constants too: the float32 absmax of every block is centred on the
mean, and quantized to 8 bits in blocks of 256 with bitsandbytes' signed dynamic map, one float32 scale
per 256 blocks. The constants then cost about 1 byte per 64 weights instead of 4.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

NF4_BLOCK_SIZE = 64
ABSMAX_BLOCK_SIZE = 256
# QLoRA's offset: the outermost quantile used, (1 - 1/(2*15) + 1 - 1/(2*16)) / 2, so that +-1 are levels.
NF4_OFFSET = 0.9677083


def normal_quantile(p):
    """The standard normal's quantile function (inverse CDF)."""
    return 2 ** 0.5 * torch.erfinv(2 * p - 1)


def nf4_codebook() -> torch.Tensor:
    """The 16 NF4 levels in [-1, 1], built as QLoRA's create_normal_map: 8 positive and 7 negative normal
    quantiles, zero, normalised by the largest. Returns float32 (16,), ascending."""
    positive = normal_quantile(torch.linspace(NF4_OFFSET, 0.5, 9)[:-1].double())  # (8,)
    negative = -normal_quantile(torch.linspace(NF4_OFFSET, 0.5, 8)[:-1].double())  # (7,)
    levels = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values
    return (levels / levels.max()).float()


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (create_dynamic_map(signed=True)): 256 ascending levels in
    [-1, 1], dense near zero, used for the double quantization of the absmax constants."""
    levels = [0.0, 1.0]
    max_exponent_bits = 7
    for i in range(max_exponent_bits):
        boundaries = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float64)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        scale = 10.0 ** (-(max_exponent_bits - 1) + i)
        levels += (scale * means).tolist() + (-scale * means).tolist()
    return torch.tensor(sorted(levels), dtype=torch.float32)


def nearest_level(values, levels):
    """Index (uint8) of the nearest entry of the ascending `levels` for every entry of `values`."""
    midpoints = (levels[1:] + levels[:-1]) / 2
    return torch.bucketize(values.contiguous(), midpoints).to(torch.uint8)


def blockwise_absmax(values, block_size: int):
    """Cut the flat `values` into blocks, zero-padded to a whole number of blocks.
    Returns the blocks (n_blocks, block_size) and their absolute maxima (n_blocks,)."""
    n_blocks = -(-values.numel() // block_size)
    padded = torch.zeros(n_blocks * block_size, dtype=values.dtype, device=values.device)
    padded[: values.numel()] = values.reshape(-1)
    blocks = padded.view(n_blocks, block_size)  # (n_blocks, block_size)
    return blocks, blocks.abs().amax(dim=1)


@dataclass
class QuantizedAbsmax:
    """Double-quantized block constants: absmax ~= levels[codes] * scale (per 256 codes) + offset."""

    codes: torch.Tensor  # (n_blocks,) uint8 indices into dynamic_map()
    scale: torch.Tensor  # (ceil(n_blocks / 256),) float32
    offset: torch.Tensor  # () float32, the mean absmax


def quantize_absmax(absmax, levels) -> QuantizedAbsmax:
    """8-bit blockwise quantization of the centred absmax constants (blocks of 256)."""
    offset = absmax.mean()
    blocks, scale = blockwise_absmax(absmax - offset, ABSMAX_BLOCK_SIZE)  # (n, 256), (n,)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = nearest_level(blocks / safe[:, None], levels).reshape(-1)[: absmax.numel()]
    return QuantizedAbsmax(codes, scale, offset)


def dequantize_absmax(quantized: QuantizedAbsmax, levels) -> torch.Tensor:
    n = quantized.codes.numel()
    values = levels[quantized.codes.long()]  # (n_blocks,)
    scale = quantized.scale.repeat_interleave(ABSMAX_BLOCK_SIZE)[:n]  # (n_blocks,)
    return values * scale + quantized.offset


def pack_nibbles(codes):
    """Two 4-bit codes per byte: the first in the high nibble, as bitsandbytes. codes: (2n,) -> (n,) uint8."""
    pairs = codes.view(-1, 2)  # (n, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def unpack_nibbles(packed):
    """Inverse of pack_nibbles: (n,) uint8 -> (2n,) uint8."""
    return torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1)  # (2n,)


@dataclass
class NF4Tensor:
    """A quantized weight: packed codes, block constants (plain or double-quantized) and the original shape."""

    packed: torch.Tensor  # (n_blocks * 64 / 2,) uint8
    absmax: Optional[torch.Tensor]  # (n_blocks,) float32, or None when double-quantized
    quantized_absmax: Optional[QuantizedAbsmax]
    shape: torch.Size


def quantize_nf4_tensor(weight, double_quant: bool = True, block_size: int = NF4_BLOCK_SIZE) -> NF4Tensor:
    """Quantize any float tensor to NF4 in blocks of `block_size` (even), optionally double-quantizing
    the absmax constants."""
    if block_size <= 0 or block_size % 2:
        raise ValueError(f"block_size must be a positive even number, got {block_size}")
    codebook = nf4_codebook().to(weight.device)
    blocks, absmax = blockwise_absmax(weight.detach().float(), block_size)  # (n, bs), (n,)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    codes = nearest_level(blocks / safe[:, None], codebook).reshape(-1)  # (n * bs,)
    packed = pack_nibbles(codes)
    if double_quant:
        return NF4Tensor(packed, None, quantize_absmax(absmax, dynamic_map().to(weight.device)), weight.shape)
    return NF4Tensor(packed, absmax, None, weight.shape)


def nibble_pair_table(codebook) -> torch.Tensor:
    """The two levels each packed byte stands for: (256, 2), row b = (codebook[b >> 4], codebook[b & 15])."""
    return torch.stack([codebook.repeat_interleave(16), codebook.repeat(16)], dim=1)


def dequantize_nf4_tensor(tensor: NF4Tensor, dtype=torch.float32, codebook=None, absmax_levels=None):
    """Back to a float tensor of the original shape. `codebook` / `absmax_levels` may be passed already on
    the right device to avoid rebuilding them.

    Each packed byte is looked up whole in a 256-row table of level pairs (an embedding lookup), which is
    several times faster than unpacking the nibbles and indexing the codebook twice; the values are the same.
    """
    device = tensor.packed.device
    codebook = nf4_codebook().to(device) if codebook is None else codebook
    if tensor.quantized_absmax is not None:
        levels = dynamic_map().to(device) if absmax_levels is None else absmax_levels
        absmax = dequantize_absmax(tensor.quantized_absmax, levels)
    else:
        absmax = tensor.absmax
    pairs = F.embedding(tensor.packed.int(), nibble_pair_table(codebook))  # (n * bs / 2, 2)
    blocks = pairs.view(absmax.numel(), -1).mul_(absmax[:, None])  # (n, bs)
    numel = tensor.shape.numel()
    return blocks.view(-1)[:numel].view(tensor.shape).to(dtype)
