"""Checkpoints and Hugging Face files: resolving hub ids, weight files, pretrained load and save, quantized load,
tokenizer files."""
