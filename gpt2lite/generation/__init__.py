"""Decoding: GenerationConfig, KVCache and generate (decoding), transformers' beam search (beam_search), the
logits processors: repetition penalty, n-gram ban, minimum length, stop strings (logits_process)."""

from gpt2lite.generation.decoding import GenerationConfig, KVCache, generate

__all__ = ["GenerationConfig", "KVCache", "generate"]
