"""Soft-prompt (prompt) tuning (Lester et al., 2021): n trainable "virtual token" embeddings prepended to
the input embeddings; everything else is frozen.

The prompt is injected into the model (`model.transformer.virtual_tokens`), not wrapped around it, so the
model keeps GPT-2's forward signature and its outputs stay aligned with input_ids:

    input        [p_1 .. p_n, x_1 .. x_T]     n virtual tokens, then the real ones
    positions     0 .. n-1,   n + (0 .. T-1)  as peft with transformers' GPT-2 (real tokens after the prompt)
    mask          1 .. 1,     attention_mask  the prompt is always attended to
    output                    h_1 .. h_T      the prompt's own outputs are dropped

Position ids passed in count real tokens from 0 (gpt2lite.generate derives them from the mask, so left
padding does not shift them); the prompt adds n. With a KV cache the prompt is prepended once, at the
first call, and occupies n cache slots (`model.num_virtual_tokens`, which generate reserves).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn as nn

from ..hf import CheckpointError
from .freeze import classifier_head_parameters, train_only
from .inject import unchanged_on_error
from .modules_to_save import modules_to_save_of, train_classifier_head

INITS = ("random", "vocab", "text")
PEFT_INIT_NAMES = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}


class SoftPrompt(nn.Module):
    """n_tokens trainable embeddings (n_tokens, n_embd) placed before every sequence."""

    def __init__(self, embedding: torch.Tensor, context: int, init: str = "random", init_text: Optional[str] = None):
        super().__init__()
        self.embedding = nn.Parameter(embedding)  # (n_tokens, n_embd)
        self.context = context  # the model's n_positions
        self.init, self.init_text = init, init_text
        self.adapter_enabled = True

    @property
    def n_tokens(self) -> int:
        return self.embedding.size(0)

    def adapter_parameters(self):
        return [self.embedding]

    def forward(self, inputs_embeds, attention_mask, position_ids, kv_cache):
        """Prepend the prompt to inputs_embeds (B, T, C) on the first call; extend the mask and positions."""
        if not self.adapter_enabled:
            return inputs_embeds, attention_mask, position_ids, kv_cache
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


def mask_with_virtual_tokens(attention_mask, n: int, total: int):
    """Prepend n ones to an attention mask (B, total - n) that covers the real tokens only; a mask of any
    other width is returned as it is (the model checks it)."""
    if attention_mask is None or attention_mask.size(-1) != total - n:
        return attention_mask
    ones = attention_mask.new_ones(attention_mask.size(0), n)
    return torch.cat([ones, attention_mask], dim=1)  # (B, total)


def check_virtual_tokens(model: nn.Module, n_tokens: int, what: str):
    """Validate n_tokens for `model` and that no prompt or prefix is injected yet."""
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens <= 0:
        raise ValueError(f"{what} needs n_tokens > 0 (an integer), got {n_tokens!r}")
    body = getattr(model, "transformer", None)
    if body is None or not hasattr(body, "virtual_tokens"):
        raise TypeError(f"{what} needs a gpt2lite GPT2 or GPT2ForSequenceClassification, got {type(model).__name__}")
    context = model.config.n_positions
    if n_tokens >= context:
        raise ValueError(f"{n_tokens} virtual tokens leave no room in the context of {context} positions; "
                         f"use fewer than {context} (typically 10-100)")
    if body.virtual_tokens is not None:
        raise ValueError(f"the model already has a {type(body.virtual_tokens).__name__}; "
                         "use a fresh model for another prompt or prefix")


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
    prompt = SoftPrompt(embedding, model.config.n_positions, init, init_text).train(model.training)
    head = train_classifier_head(model)
    model.transformer.virtual_tokens = prompt
    model.num_virtual_tokens = n_tokens
    return train_only(model, [prompt.embedding] + head)


def text_token_ids(text: str, n_tokens: int, tokenizer=None) -> torch.Tensor:
    """The tokens of `text`, repeated or truncated to exactly n_tokens (peft's TEXT initialisation)."""
    if tokenizer is None:
        from ..tokenizer import Tokenizer

        tokenizer = Tokenizer()
    ids = list(tokenizer.encode(text))
    if not ids:
        raise ValueError("init_text is empty after tokenization; give a few words describing the task")
    ids = (ids * (-(-n_tokens // len(ids))))[:n_tokens]
    return torch.tensor(ids, dtype=torch.long)


def soft_prompt(model: nn.Module) -> Optional[SoftPrompt]:
    module = getattr(getattr(model, "transformer", None), "virtual_tokens", None)
    return module if isinstance(module, SoftPrompt) else None


def is_applied(model: nn.Module) -> bool:
    return soft_prompt(model) is not None


# --- peft's format ----------------------------------------------------------------------------------

def task_type(model: nn.Module) -> str:
    return "SEQ_CLS" if classifier_head_parameters(model) else "CAUSAL_LM"


def score_head_tensors(model: nn.Module, key_prefix: str) -> dict:
    """A classifier's trained score head as peft saves it for SEQ_CLS (module to save "score"), else nothing.
    key_prefix: "base_model." for prompt learning, "base_model.model." for IA3."""
    wrapper = modules_to_save_of(model).get("score")
    if wrapper is None:
        return {}
    return {f"{key_prefix}score.{name}": tensor for name, tensor in wrapper.adapter_state_dict().items()}


def load_score_head(model: nn.Module, tensors: dict, key_prefix: str):
    """Copy a saved score head (see score_head_tensors) into the model's trainable copy; the names and
    shapes were checked with check_adapter_tensors."""
    own = score_head_tensors(model, key_prefix)
    with torch.no_grad():
        for key, tensor in own.items():
            tensor.copy_(tensors[key])


def score_head_hint(model: nn.Module) -> str:
    if classifier_head_parameters(model):
        return f"a classifier's adapter holds its score head ({model.config.num_labels} labels here)"
    return "a classifier's adapter (with score.*) loads into a GPT2ForSequenceClassification"


def write_peft_files(directory: str, adapter_config: dict, tensors: dict):
    """Write the adapter files, tensors in float32 (as peft keeps adapters of a 16-bit base)."""
    from .adapter_io import write_adapter_files

    write_adapter_files(directory, adapter_config, {k: v.float() for k, v in tensors.items()})


def read_peft_tensors(directory: str):
    """(path, tensors) of the adapter's weights file; a CheckpointError naming the file if it is missing or
    unreadable."""
    from .adapter_io import adapter_weights_path, read_adapter_tensors

    path = adapter_weights_path(directory)
    return path, read_adapter_tensors(path)


def prompt_learning_config(model: nn.Module, peft_type: str, n_tokens: int) -> dict:
    """The fields peft's prompt-learning configs share, for this model."""
    config = model.config
    return {
        "peft_type": peft_type, "task_type": task_type(model), "num_virtual_tokens": n_tokens,
        "token_dim": config.n_embd, "num_layers": config.n_layer, "num_attention_heads": config.n_head,
        "num_transformer_submodules": 1, "inference_mode": True, "base_model_name_or_path": None,
        "revision": None, "auto_mapping": None,
        "modules_to_save": ["classifier", "score"] if classifier_head_parameters(model) else None,
    }


def check_prompt_learning_config(model: nn.Module, directory: str, adapter_config: dict, peft_type: str):
    """Raise a CheckpointError naming the config file when a prompt-learning adapter was made for another
    model size or method."""
    path = os.path.join(directory, "adapter_config.json")
    if adapter_config.get("peft_type") != peft_type:
        raise CheckpointError(f"{path}: expected a {peft_type} adapter, got peft_type="
                              f"{adapter_config.get('peft_type')!r}")
    config = model.config
    for key, ours in (("token_dim", config.n_embd), ("num_layers", config.n_layer),
                      ("num_attention_heads", config.n_head), ("num_transformer_submodules", 1)):
        theirs = adapter_config.get(key, ours)
        if theirs != ours:
            raise CheckpointError(f"{path}: the adapter was made for {key}={theirs}, this model has {key}={ours}: "
                                  "load it into the base model it was trained on")


def read_prompt_table(directory: str, adapter_config: dict, width: int):
    """(path, tensors, table) of a prompt-learning adapter: "prompt_embeddings" (n, width), n as the
    config's num_virtual_tokens; a CheckpointError naming the file otherwise."""
    path, tensors = read_peft_tensors(directory)
    table = tensors.get("prompt_embeddings")
    n = adapter_config.get("num_virtual_tokens")
    if table is None or table.dim() != 2 or table.size(1) != width or (n is not None and table.size(0) != n):
        found = "nothing" if table is None else f"shape {tuple(table.shape)}"
        raise CheckpointError(f"{path}: prompt_embeddings should be ({n if n is not None else 'n'}, {width}), "
                              f"found {found}: the adapter was made for another model size or is damaged")
    return path, tensors, table


def save_peft(model: nn.Module, directory: str):
    """Save the soft prompt as peft does (PROMPT_TUNING: the tensor "prompt_embeddings" (n, n_embd))."""
    prompt = soft_prompt(model)
    if prompt is None:
        raise ValueError("the model has no soft prompt; call add_soft_prompt first")
    adapter_config = prompt_learning_config(model, "PROMPT_TUNING", prompt.embedding.size(0))
    adapter_config.update({
        "prompt_tuning_init": PEFT_INIT_NAMES[prompt.init], "prompt_tuning_init_text": prompt.init_text,
        # peft's config requires a tokenizer name with TEXT init; it only reads it when training starts
        "tokenizer_name_or_path": "openai-community/gpt2" if prompt.init == "text" else None,
        "tokenizer_kwargs": None,
    })
    tensors = {"prompt_embeddings": prompt.embedding, **score_head_tensors(model, "base_model.")}
    write_peft_files(directory, adapter_config, tensors)


def load_peft(model: nn.Module, directory: str, adapter_config: dict) -> nn.Module:
    """Load a peft PROMPT_TUNING adapter: inject a soft prompt if there is none, then copy its embeddings.
    All or nothing: on a CheckpointError the model is unchanged."""
    from .adapter_io import check_adapter_tensors

    check_prompt_learning_config(model, directory, adapter_config, "PROMPT_TUNING")
    path, tensors, embedding = read_prompt_table(directory, adapter_config, model.config.n_embd)  # (n, C)
    with unchanged_on_error(model):
        prompt = soft_prompt(model)
        if prompt is None:
            add_soft_prompt(model, embedding.size(0))
            prompt = soft_prompt(model)
        expected = {"prompt_embeddings": prompt.embedding.shape,
                    **{k: v.shape for k, v in score_head_tensors(model, "base_model.").items()}}
        check_adapter_tensors(path, tensors, expected, "another number of virtual tokens than the model's prompt? "
                              + score_head_hint(model))
        with torch.no_grad():
            prompt.embedding.copy_(embedding)
        load_score_head(model, tensors, "base_model.")
    return model
