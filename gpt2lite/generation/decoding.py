"""Autoregressive generation with a pre-allocated key/value cache.

The prompt is run once (prefill); every later step feeds one token per sequence (or beam) and attends to
the cache. GenerationConfig holds the controls; those that read the tokens so far live in logits_process.py,
beam search in beam_search.py.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional, Tuple

import torch

from gpt2lite.generation.beam_search import beam_search
from gpt2lite.generation.logits_process import Controls


@dataclass(frozen=True)
class GenerationConfig:
    """How `generate` picks tokens; every field is also a keyword argument of `generate` (and a CLI flag).

    Field names and meanings follow transformers' GenerationConfig, and so does the behaviour (tested
    token for token against transformers' generate): see README "Generation controls".
    """

    max_new_tokens: int = 64  # new tokens at most, after each prompt
    min_new_tokens: int = 0  # eos cannot end a sequence before this many new tokens (stop strings still can)
    temperature: float = 0.0  # 0: greedy (or beam search); > 0: sample from softmax(logits / temperature)
    top_k: Optional[int] = None  # sampling: keep the k most likely tokens
    top_p: Optional[float] = None  # sampling: keep the smallest set of tokens holding top_p of the mass
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or the output (CTRL); 1: off
    no_repeat_ngram_size: int = 0  # > 0: no n-gram of this size occurs twice in prompt + output
    num_beams: int = 1  # > 1: beam search (deterministic; temperature must be 0)
    length_penalty: float = 1.0  # beam search: a hypothesis scores sum(log p) / n_new ** length_penalty (> 0: longer)
    early_stopping: bool = False  # beams: True ends a prompt at num_beams hypotheses; False: when none can improve
    stop_strings: Tuple[str, ...] = ()  # a sequence ends once a new token completes one (needs tokenizer=)
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
        object.__setattr__(self, "stop_strings", tuple(self.stop_strings))  # a list (YAML, CLI) works too
        if not all(isinstance(s, str) and s for s in self.stop_strings):
            raise ValueError(f"stop_strings must be non-empty strings, got {self.stop_strings!r}")
        if self.stop_strings and self.eos_id is None and self.pad_id is None:
            raise ValueError("stop_strings need a pad_id to fill sequences that have stopped (eos_id is None)")
        if not isinstance(self.early_stopping, bool):
            raise TypeError(f"early_stopping must be True or False, got {self.early_stopping!r}")


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

    def repeat_interleave(self, n: int):
        """Repeat every row n times in place of it (B -> B * n rows), e.g. once per beam after the prefill."""
        self.k = self.k.repeat_interleave(n, dim=1)
        self.v = self.v.repeat_interleave(n, dim=1)

    def reorder(self, index):
        """Row i becomes a copy of row index[i] (index: (B,) long), for the positions stored so far: beam
        search keeping the beams it chose."""
        L = self.length
        for layer in range(self.k.size(0)):  # a layer at a time: the copy is 1/n_layer of the cache
            self.k[layer, :, :, :L] = self.k[layer, :, :, :L].index_select(0, index)
            self.v[layer, :, :, :L] = self.v[layer, :, :, :L].index_select(0, index)


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
def generate(model, input_ids, max_new_tokens: Optional[int] = None, attention_mask=None, *,
             config: Optional[GenerationConfig] = None, tokenizer=None, **controls):
    """Generate after each prompt. Returns the new tokens only, (B, n_new), with pad_id after a sequence ends.

    input_ids: (B, T); prompts of different lengths are left-padded, with attention_mask (B, T) marking
    the real tokens, and their positions count from each prompt's first real token.
    config: a GenerationConfig; `max_new_tokens` and the keyword arguments (any GenerationConfig field, e.g.
    temperature=0.7, num_beams=4) override its fields; without config they build one. Greedy when
    temperature == 0 (beam search with num_beams > 1); otherwise samples with optional top_k / top_p,
    reproducibly with `seed`. A sequence ends at eos_id or at a stop string; eos_id=None never ends at a token.
    tokenizer: decodes tokens for stop_strings: anything with .decode(ids) (gpt2lite.Tokenizer, a
    transformers tokenizer), or a function ids -> str.
    """
    config = _resolve_config(config, max_new_tokens, controls)
    attention_mask = _check_prompts(input_ids, attention_mask)
    B, T = input_ids.shape
    extra = getattr(model, "num_virtual_tokens", 0)  # soft prompts and prefixes occupy cache positions too
    context = model.config.n_positions
    if T + extra + config.max_new_tokens - 1 > context:  # the last new token is never fed back
        raise ValueError(
            f"prompt ({T} tokens) + {config.max_new_tokens} new tokens exceed the context of {context}; "
            "shorten the prompt or ask for fewer tokens"
        )
    beams = config.num_beams
    history = None  # the controls that read each sequence's tokens, over every beam
    if Controls.needed(config):
        decode = getattr(tokenizer, "decode", tokenizer)
        history = Controls(input_ids.repeat_interleave(beams, 0), attention_mask.repeat_interleave(beams, 0),
                           config, model.config.vocab_size, decode)
    was_training = model.training
    model.eval()
    try:
        cache = KVCache.for_model(model, B, T + extra + config.max_new_tokens)
        logits, mask, next_position = _prefill(model, input_ids, attention_mask, cache)
        if beams > 1:
            return beam_search(model, cache, logits, mask, next_position, config, history)
        return _one_sequence_per_row(model, cache, logits, mask, next_position, config, history)
    finally:
        model.train(was_training)


def _resolve_config(config: Optional[GenerationConfig], max_new_tokens: Optional[int], overrides: dict):
    """The GenerationConfig of a generate call: `config` (or the defaults) with the keyword overrides."""
    if config is not None and not isinstance(config, GenerationConfig):
        raise TypeError(f"config must be a gpt2lite GenerationConfig, got {type(config).__name__}")
    unknown = sorted(set(overrides) - {f.name for f in fields(GenerationConfig)})
    if unknown:
        raise TypeError(f"generate() got unknown arguments {unknown}; the controls are GenerationConfig's fields: "
                        f"{[f.name for f in fields(GenerationConfig)]}")
    if max_new_tokens is not None:
        overrides = {**overrides, "max_new_tokens": max_new_tokens}
    return replace(config, **overrides) if config is not None else GenerationConfig(**overrides)


def _check_prompts(input_ids, attention_mask):
    """Refuse prompts generation cannot continue; returns the attention mask (all ones by default)."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}; "
                         "for one prompt use input_ids[None]")
    if input_ids.size(1) == 0:
        raise ValueError("empty prompt: input_ids has 0 tokens per row; give every prompt at least one token "
                         "(for unconditional text, start from <|endoftext|> = 50256)")
    if attention_mask is None:
        return torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids "
                         f"{tuple(input_ids.shape)}: they must match")
    empty = (attention_mask == 0).all(dim=1).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"empty prompt: attention_mask row {empty[0]} is all zeros (rows {empty} have no real "
                         "token); give every prompt at least one token")
    if bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("prompts must be left-padded for generation (padding_side='left')")
    return attention_mask


def _prefill(model, input_ids, attention_mask, cache):
    """Run the prompts once into the cache. Returns the last logits (B, 1, V), the mask (B, T) and each
    row's next position (B, 1)."""
    # position of each token counted from the prompt's first real token (left padding gets position 0)
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
    mask = attention_mask.long()
    logits = model(input_ids, attention_mask=mask, position_ids=positions, kv_cache=cache, last_only=True)
    return logits, mask, positions[:, -1:] + 1


def _one_sequence_per_row(model, cache, logits, mask, next_position, config, history=None):
    """Greedy or sampled decoding, one token per row and step; history: the controls (None: none asked)."""
    B = logits.size(0)
    device = logits.device
    eos_id = config.eos_id
    pad_id = eos_id if config.pad_id is None else config.pad_id
    stops = history is not None and history.stop is not None
    can_end = eos_id is not None or stops
    generator = None
    if config.seed is not None:
        generator = torch.Generator(device=device).manual_seed(config.seed)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    out = []
    for step in range(config.max_new_tokens):
        scores = logits[:, -1, :]
        if history is not None:
            scores = history.process(scores.float())
        token = sample_next(scores, config.temperature, config.top_k, config.top_p, generator)  # (B,)
        if can_end:
            token = torch.where(done, torch.full_like(token, pad_id), token)
            if eos_id is not None:
                done = done | (token == eos_id)
            if stops:
                done = done | _stop_string_hits(history, token, done)
        if history is not None:
            history.append(token)
        out.append(token)
        if step == config.max_new_tokens - 1 or (can_end and bool(done.all())):
            break
        mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=device)], dim=1)
        logits = model(token[:, None], attention_mask=mask, position_ids=next_position, kv_cache=cache)
        next_position = next_position + 1
    return torch.stack(out, dim=1)  # (B, n_new)


def _stop_string_hits(history, token, done):
    """(B,) bool: the rows not yet done whose new token completes a stop string."""
    rows = (~done).nonzero().flatten().tolist()
    hits = torch.zeros_like(done)
    hits[rows] = torch.tensor(history.stopped(rows, token[rows].tolist()), dtype=torch.bool, device=done.device)
    return hits
