"""Soft-prompt (prompt) tuning (Lester et al., 2021): n trainable "virtual token" embeddings prepended to
the input embeddings; everything else is frozen.

    input        [p_1 .. p_n, x_1 .. x_T]     n virtual tokens, then the real ones
    positions     0 .. n-1,   n + (0 .. T-1)  as peft with transformers' GPT-2 (real tokens after the prompt)
    mask          1 .. 1,     attention_mask  the prompt is always attended to
    output                    h_1 .. h_T      the prompt's own outputs are dropped

Position ids passed in count real tokens from 0 (gpt2lite.generation.decoding derives them from the mask, so left
padding does not shift them); the prompt adds n. With a KV cache the prompt is prepended once, at the
first call, and occupies n cache slots (see virtual_tokens.py for what prompts and prefixes share).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from gpt2lite.peft.virtual_tokens import VirtualTokens, check_virtual_tokens, install, mask_with_virtual_tokens

INITS = ("random", "vocab", "text")


class SoftPrompt(VirtualTokens):
    """n_tokens trainable embeddings (n_tokens, n_embd) placed before every sequence."""

    def __init__(self, embedding: torch.Tensor, context: int, init: str = "random", init_text: Optional[str] = None):
        super().__init__()
        self.embedding = nn.Parameter(embedding)  # (n_tokens, n_embd)
        self.context = context  # the model's n_positions
        self.init, self.init_text = init, init_text  # saved in peft's config

    @property
    def label_offset(self) -> int:
        """1 while enabled: the last virtual token predicts the first real token, so labels[:, 0] is scored
        (as in peft)."""
        return 1 if self.adapter_enabled else 0

    def insert(self, inputs_embeds, attention_mask, position_ids, kv_cache):
        """Prepend the prompt to inputs_embeds (B, T, C) on the first call; extend the mask and positions."""
        n = self.n_tokens
        B, T, _ = inputs_embeds.shape
        first_call = kv_cache is None or kv_cache.length == 0
        if first_call:
            prompt = self.embedding.to(inputs_embeds.dtype).expand(B, -1, -1)  # (B, n, C)
            inputs_embeds = torch.cat([prompt, inputs_embeds], dim=1)  # (B, n + T, C)
        past = kv_cache.length if kv_cache is not None else 0
        check_fits(past + inputs_embeds.size(1), n, self.context)
        attention_mask = mask_with_virtual_tokens(attention_mask, n, past + inputs_embeds.size(1))
        if position_ids is not None:
            position_ids = position_ids + n
            if first_call:
                prompt_positions = torch.arange(n, device=position_ids.device, dtype=position_ids.dtype)
                prompt_positions = prompt_positions.expand(*position_ids.shape[:-1], n)  # (B, n) or (n,)
                position_ids = torch.cat([prompt_positions, position_ids], dim=-1)  # (B, n + T) or (n + T,)
        return inputs_embeds, attention_mask, position_ids, kv_cache


def check_fits(total: int, n: int, context: int):
    """Raise a clear error when n virtual tokens plus the real ones exceed the context."""
    if total > context:
        raise ValueError(f"{total - n} tokens + {n} virtual tokens exceed the context of {context} positions; "
                         f"truncate inputs to {context - n} tokens (max_length={context - n})")


def add_soft_prompt(model: nn.Module, n_tokens: int, init_text: Optional[str] = None, init: Optional[str] = None,
                    tokenizer=None, generator: Optional[torch.Generator] = None) -> nn.Module:
    """Inject n_tokens trainable prompt embeddings; freeze the rest. A classifier's score head trains too,
    as a modules_to_save copy beside the frozen original (peft's SEQ_CLS).

    init: "random" (N(0, 1), as peft's RANDOM), "vocab" (embeddings of random vocabulary tokens, peft's
    SAMPLE_VOCAB) or "text" (the embeddings of `init_text`'s tokens, repeated or cut to n_tokens, peft's
    TEXT); default "text" when init_text is given, else "random". tokenizer: anything with encode(str)
    (default gpt2lite.Tokenizer()). Real tokens are then limited to n_positions - n_tokens.
    """
    check_virtual_tokens(model, n_tokens, "add_soft_prompt")
    init = init or ("text" if init_text is not None else "random")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if (init == "text") != (init_text is not None):
        raise ValueError('pass init_text together with init="text" (e.g. init_text="Summarize the following article:")')
    wte = model.transformer.wte.weight
    if init == "random":
        embedding = torch.randn(n_tokens, wte.size(1), generator=generator, device=wte.device)
    else:
        if init == "vocab":
            token_ids = torch.randint(0, wte.size(0), (n_tokens,), generator=generator, device=wte.device)
        else:
            token_ids = text_token_ids(init_text, n_tokens, tokenizer).to(wte.device)
        embedding = wte.detach()[token_ids].float().clone()  # (n_tokens, C)
    return install(model, SoftPrompt(embedding, model.config.n_positions, init, init_text))


def text_token_ids(text: str, n_tokens: int, tokenizer=None) -> torch.Tensor:
    """The tokens of `text`, repeated or truncated to exactly n_tokens (peft's TEXT initialisation)."""
    if tokenizer is None:
        from gpt2lite.tokenizer import Tokenizer

        tokenizer = Tokenizer()
    ids = list(tokenizer.encode(text))
    if not ids:
        raise ValueError("init_text is empty after tokenization; give a few words describing the task")
    ids = (ids * (-(-n_tokens // len(ids))))[:n_tokens]
    return torch.tensor(ids, dtype=torch.long)


def soft_prompt(model: nn.Module) -> Optional[SoftPrompt]:
    """The model's soft prompt, or None."""
    return SoftPrompt.of(model)


def is_applied(model: nn.Module) -> bool:
    return soft_prompt(model) is not None
