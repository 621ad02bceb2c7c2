"""LoRA and DoRA: the layers (layer), and LoRA over 4-bit base layers (quantized)."""
