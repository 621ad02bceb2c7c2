"""Autoregressive generation with a pre-allocated key/value cache.

The prompt is run once (prefill); every later step feeds one token per sequence and attends to the cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class GenerationConfig:
    """How `generate` picks tokens; every field is also a keyword argument of `generate` (and a CLI flag).

    Field names and meanings follow transformers' GenerationConfig.
    """

    max_new_tokens: int = 64  # new tokens at most, after each prompt
    min_new_tokens: int = 0  # eos (and stop strings) cannot end a sequence before this many new tokens
    temperature: float = 0.0  # 0: greedy (or beam search); > 0: sample from softmax(logits / temperature)
    top_k: Optional[int] = None  # sampling: keep the k most likely tokens
    top_p: Optional[float] = None  # sampling: keep the smallest set of tokens holding top_p of the mass
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or the output (CTRL)
    no_repeat_ngram_size: int = 0  # > 0: no n-gram of this size occurs twice in prompt + output
    num_beams: int = 1  # > 1: beam search (deterministic; temperature must be 0)
    length_penalty: float = 1.0  # beam search: a finished beam scores sum(log p) / length ** length_penalty
    early_stopping: bool = False  # beam search: stop once num_beams finished hypotheses exist
    stop_strings: Tuple[str, ...] = ()  # a sequence ends once its decoded output ends with one of these
    eos_id: Optional[int] = 50256  # None: never stop at a token
    pad_id: Optional[int] = None  # fills a finished sequence; default eos_id
    seed: Optional[int] = None  # sampling: a seeded generator, for reproducible samples

    def __post_init__(self):
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], "
                             f"got {self.min_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k <= 0:
            raise ValueError(f"top_k must be positive, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1.0 = off), got {self.repetition_penalty}")
        if self.no_repeat_ngram_size < 0:
            raise ValueError(f"no_repeat_ngram_size must be >= 0 (0 = off), got {self.no_repeat_ngram_size}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.num_beams > 1 and self.temperature > 0:
            raise ValueError("beam search is deterministic: use temperature=0 with num_beams > 1")
        if isinstance(self.stop_strings, str):
            raise TypeError("stop_strings is a list of strings, e.g. ['\\n\\n'], not one string")


class KVCache:
    """Keys and values of every layer, allocated once: (n_layer, B, n_head, max_len, head_dim).

    The cache protocol the attention layers use: `length` (positions already stored),
    `update(layer_idx, k, v)` stores the new (B, nh, T, hs) keys and values and returns all of them up to
    length + T, and `advance(T)` moves `length` on once every layer has stored its T positions.
    """

    def __init__(self, n_layer, batch_size, n_head, max_len, head_dim, device=None, dtype=torch.float32):
        shape = (n_layer, batch_size, n_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0

    @classmethod
    def for_model(cls, model, batch_size: int, max_len: int):
        config = model.config
        weight = next(p for p in model.parameters() if p.is_floating_point())
        return cls(config.n_layer, batch_size, config.n_head, max_len, config.head_dim, weight.device, weight.dtype)

    def update(self, layer_idx: int, k, v):
        T = k.size(2)
        end = self.length + T
        if end > self.max_len:
            raise RuntimeError(f"KV cache holds {self.max_len} positions; {end} needed")
        self.k[layer_idx, :, :, self.length:end] = k
        self.v[layer_idx, :, :, self.length:end] = v
        return self.k[layer_idx, :, :, :end], self.v[layer_idx, :, :, :end]  # (B, nh, end, hs)

    def advance(self, T: int):
        self.length += T


def sample_next(logits, temperature: float = 0.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                generator=None):
    """Pick the next token from logits (B, V): greedy when temperature == 0, else sample."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)  # (B,)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass (always keep the first)
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)  # (B,)


@torch.no_grad()
def generate(model, input_ids, max_new_tokens: int, attention_mask=None, temperature: float = 0.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None, eos_id: Optional[int] = 50256,
             seed: Optional[int] = None, pad_id: Optional[int] = None):
    """Generate up to max_new_tokens after each prompt. Returns the new tokens only, (B, n_new).

    input_ids: (B, T); prompts of different lengths are left-padded, with attention_mask (B, T) marking
    the real tokens, and their positions count from each prompt's first real token. A sequence stops at
    eos_id and is then filled with pad_id (default: eos_id); eos_id=None never stops early. Greedy when
    temperature == 0; otherwise samples with optional top_k / top_p, reproducibly with `seed`.
    """
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k is not None and top_k <= 0:
        raise ValueError(f"top_k must be positive, got {top_k}")
    was_training = model.training
    model.eval()
    B, T = input_ids.shape
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("prompts must be left-padded for generation (padding_side='left')")
    extra = getattr(model, "num_virtual_tokens", 0)  # soft prompts occupy cache positions too
    context = model.config.n_positions
    if T + extra + max_new_tokens - 1 > context:  # the last new token is never fed back
        raise ValueError(
            f"prompt ({T} tokens) + {max_new_tokens} new tokens exceed the context of {context}; "
            "shorten the prompt or ask for fewer tokens"
        )
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    pad_id = eos_id if pad_id is None else pad_id
    cache = KVCache.for_model(model, B, T + extra + max_new_tokens)
    # position of each token counted from the prompt's first real token (left padding gets position 0)
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
    mask = attention_mask.long()
    logits = model(input_ids, attention_mask=mask, position_ids=positions, kv_cache=cache, last_only=True)
    next_position = positions[:, -1:] + 1  # (B, 1)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    out = []
    for step in range(max_new_tokens):
        token = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)  # (B,)
        if eos_id is not None:
            token = torch.where(done, torch.full_like(token, pad_id), token)
            done = done | (token == eos_id)
        out.append(token)
        if step == max_new_tokens - 1 or (eos_id is not None and bool(done.all())):
            break
        mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=device)], dim=1)
        logits = model(token[:, None], attention_mask=mask, position_ids=next_position, kv_cache=cache)
        next_position = next_position + 1
    model.train(was_training)
    return torch.stack(out, dim=1)  # (B, n_new)
