"""Decoding: GenerationConfig, KVCache and generate (decoding), beam search, logits processors."""
