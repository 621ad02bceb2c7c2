"""GPT-2 written by hand, with Hugging Face's module names.

    GPT2
    ├── transformer (GPT2Model)
    │   ├── wte, wpe          token and position embeddings
    │   ├── drop
    │   ├── h[i] (Block)      x + attn(ln_1(x)); x + mlp(ln_2(x))
    │   │   ├── attn          attention.py: c_attn (fused q, k, v), c_proj
    │   │   ├── mlp.c_fc, mlp.c_proj
    │   └── ln_f
    └── lm_head               tied to transformer.wte

Linear layers are plain nn.Linear (weight of shape (out, in)); Hugging Face's GPT-2 stores them as Conv1D
(in, out), and hf.py transposes the four affected weights on load and save.

The code is the textbook path. Every model is built with gpt2lite.kernels' faster equivalents switched on
(`use_fast_kernels` at the end of each model's __init__: FastLinear layers, `sdpa` and `lm_loss` slots);
`use_fast_kernels(model, False)` runs exactly what is written here.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from gpt2lite.model.architectures import architecture
from gpt2lite.model.attention import attention_mask_for
from gpt2lite.model.config import GPT2Config
from gpt2lite.model.input_checks import checked_class_labels, checked_token_ids
from gpt2lite.kernels import use_fast_kernels
from gpt2lite.loss import IGNORE_INDEX, lm_loss


def gelu_tanh(x):
    return F.gelu(x, approximate="tanh")  # GPT-2's "gelu_new"


ACTIVATION_FUNCTIONS = {"gelu_new": gelu_tanh, "gelu_pytorch_tanh": gelu_tanh, "gelu": F.gelu, "relu": F.relu}


class MLP(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.mlp_dim)
        self.c_proj = nn.Linear(config.mlp_dim, config.n_embd)
        self.act = ACTIVATION_FUNCTIONS[config.activation_function]
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x):
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = architecture(config.model_type).attention_class(config, layer_idx)  # GPT-2's: CausalSelfAttention
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x, mask=None, kv_cache=None):
        x = x + self.attn(self.ln_1(x), mask, kv_cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT2Model(nn.Module):
    """The transformer body: embeddings, blocks, final LayerNorm. Returns hidden states (B, T, C)."""

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        # an adapter's virtual tokens (peft's soft prompt or prefix), called as below; it publishes
        # n_tokens and label_offset (how many of its own outputs, the last ones, predict labels)
        self.virtual_tokens = None
        self.activation_checkpointing = False  # see PreTrained.set_activation_checkpointing

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, kv_cache=None, inputs_embeds=None,
                with_label_offset: bool = False):
        """input_ids: (B, T) token ids, or inputs_embeds: (B, T, C).

        attention_mask: (B, S) with S = past + T, 1 = token, 0 = padding; a (B, T) mask with a non-empty
        cache is taken to cover only the new tokens (the cached ones count as real).
        position_ids: (B, T) or (T,); by default past, past+1, ... as in Hugging Face.
        kv_cache: an object with `.length`, `.update(layer_idx, k, v) -> (k_all, v_all)` and `.advance(T)`.
        with_label_offset: when virtual tokens were prepended, return first the outputs at the last
        `virtual_tokens.label_offset` of them, the positions that predict the first labels (a soft prompt's
        last token predicts the first real token): (B, offset + T, C).
        """
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids (B, T) or inputs_embeds (B, T, C)")
            input_ids = self._check_ids(input_ids)
            inputs_embeds = self.wte(input_ids)  # (B, T, C)
        n_real = inputs_embeds.size(1)
        if self.virtual_tokens is not None:  # prepends prompt embeddings or fills the cache with a prefix
            inputs_embeds, attention_mask, position_ids, kv_cache = self.virtual_tokens(
                inputs_embeds, attention_mask, position_ids, kv_cache)
        B, T, _ = inputs_embeds.shape
        past = kv_cache.length if kv_cache is not None else 0
        if past + T > self.config.n_positions:
            raise ValueError(
                f"input of {past + T} tokens is longer than the model's context of {self.config.n_positions}; "
                f"truncate it (e.g. Tokenizer.encode_batch(..., max_length={self.config.n_positions}))"
            )
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=inputs_embeds.device)  # (T,)
        if attention_mask is not None:
            if attention_mask.shape[-1] == T and past > 0:
                attention_mask = F.pad(attention_mask, (past, 0), value=1)
            if attention_mask.shape != (B, past + T):
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, past + T)}"
                )
            # no padding: take SDPA's fast causal path (a branch on the mask's values: not when compiling)
            if not torch.compiler.is_compiling() and bool(attention_mask.all()):
                attention_mask = None
        x = self.drop(inputs_embeds + self.wpe(position_ids))  # (B, T, C)
        masks = {}  # one mask per distinct window size
        for i, block in enumerate(self.h):
            window = self.config.window(i)
            if window not in masks:
                masks[window] = attention_mask_for(attention_mask, T, past + T, window, x.device)
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                # keep only the block's input; backward runs the block again (same dropout: the RNG state
                # is restored). Non-reentrant, so a frozen input (embeddings under LoRA) still gets gradients.
                x = torch.utils.checkpoint.checkpoint(block, x, masks[window], kv_cache, use_reentrant=False)
            else:
                x = block(x, masks[window], kv_cache)
        if kv_cache is not None:
            kv_cache.advance(T)
        offset = 0
        if with_label_offset and self.virtual_tokens is not None:
            offset = min(self.virtual_tokens.label_offset, T - n_real)  # only when they were prepended
        return self.ln_f(x[:, T - n_real - offset:])  # (B, offset + T, C): other virtual outputs are dropped

    def _check_ids(self, input_ids):
        """input_ids, checked (dtype, shape, values in the vocabulary)."""
        # refused rather than converted: int8/int16/uint8 cannot hold GPT-2's 50,257 ids, so a cast to one
        # of them may already have wrapped some of them into other valid ids
        if input_ids.dtype not in (torch.long, torch.int):
            raise TypeError(f"input_ids must be an integer tensor of dtype torch.long (or torch.int32), got "
                            f"{input_ids.dtype}, which cannot hold every token id; use torch.long")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, time), got {tuple(input_ids.shape)}")
        return checked_token_ids(input_ids, self.config.vocab_size)  # a custom op under torch.compile


class PreTrained(nn.Module):
    """What every model with a `transformer` body shares: init, HF loading/saving, cache sizing."""

    config: GPT2Config

    @property
    def label_offset(self) -> int:
        """How many positions before the first real token predict labels: what the model's virtual tokens
        publish (a soft prompt's last token predicts labels[:, 0], as in peft), 0 without any."""
        tokens = self.transformer.virtual_tokens
        return tokens.label_offset if tokens is not None else 0

    def _init_weights(self):
        """GPT-2's initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layer)."""
        std = self.config.initializer_range
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                scale = 1.0 / math.sqrt(2 * self.config.n_layer) if name.endswith("c_proj") else 1.0
                nn.init.normal_(module.weight, mean=0.0, std=std * scale)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @classmethod
    def from_pretrained(cls, name_or_path: str, dtype=None, device=None, **kwargs):
        """Load a Hugging Face checkpoint: a hub id ("gpt2", "openai-community/gpt2-medium") or a local
        directory with config.json and model.safetensors, pytorch_model.bin or a sharded index.

        quantize="nf4" (with compute_dtype=..., double_quant=True) stores the blocks' linear weights in 4 bits
        as they are read, never holding the float model (gpt2lite.hub.quantized); for QLoRA, add_lora next."""
        from gpt2lite.hub.pretrained import load_pretrained

        return load_pretrained(cls, name_or_path, dtype=dtype, device=device, **kwargs)

    def set_activation_checkpointing(self, enabled: bool = True):
        """Activation checkpointing per block: in training with gradients, each block keeps only its input
        and runs again during backward, trading about a third more compute for activation memory of one
        block instead of all. Results are unchanged (dropout draws the same masks again)."""
        self.transformer.activation_checkpointing = bool(enabled)
        return self

    def save_pretrained(self, directory: str):
        """Write config.json and model.safetensors that transformers loads."""
        from gpt2lite.hub.pretrained import save_pretrained

        save_pretrained(self, directory)


class GPT2(PreTrained):
    """GPT-2 with a language-modelling head tied to the token embedding."""

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.transformer = GPT2Model(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.lm_loss = lm_loss  # a kernel slot (gpt2lite.kernels)
        if not any(p.is_meta for p in self.parameters()):
            self._init_weights()
        use_fast_kernels(self)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, kv_cache=None,
                inputs_embeds=None, last_only: bool = False, labels=None):
        """Returns logits (B, T, vocab_size), or (B, 1, vocab_size) with last_only=True.

        With labels (B, T) (-100 where there is no target), returns instead the mean next-token
        cross-entropy over labelled positions, computing the LM head only at those positions. Behind virtual
        tokens with a label offset (a soft prompt) the first label counts too, predicted at the prompt's last
        virtual token (as in peft).
        """
        hidden = self.transformer(input_ids, attention_mask, position_ids, kv_cache, inputs_embeds,
                                  with_label_offset=labels is not None)
        if labels is not None:
            B, T = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
            offset = hidden.size(1) - T
            if offset:  # (B, offset + T, C): the virtual tokens' last outputs predict labels[:, 0], ...
                if labels.shape != (B, T):
                    raise ValueError(f"labels have shape {tuple(labels.shape)}, expected {(B, T)} as input_ids")
                labels = F.pad(labels, (offset, 0), value=IGNORE_INDEX)  # (B, offset + T)
            return self.lm_loss(hidden, labels, self.lm_head)
        if last_only:
            hidden = hidden[:, -1:, :]
        return self.lm_head(hidden)


class GPT2ForSequenceClassification(PreTrained):
    """GPT-2 body with a linear `score` head read at each sequence's last real token."""

    def __init__(self, config: GPT2Config, num_labels: Optional[int] = None):
        super().__init__()
        num_labels = num_labels if num_labels is not None else config.num_labels
        if num_labels is None or num_labels <= 0:
            raise ValueError("GPT2ForSequenceClassification needs num_labels > 0 (e.g. num_labels=20)")
        config = config.replace(num_labels=num_labels)
        self.config = config
        self.num_labels = num_labels
        self.transformer = GPT2Model(config)
        self.score = nn.Linear(config.n_embd, num_labels, bias=False)
        if not any(p.is_meta for p in self.parameters()):
            self._init_weights()
        use_fast_kernels(self)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None):
        """Returns logits (B, num_labels); with labels (B,), the mean cross-entropy instead."""
        hidden = self.transformer(input_ids, attention_mask, position_ids, None, inputs_embeds)  # (B, T, C)
        B, T, _ = hidden.shape
        last = last_token_index(input_ids, attention_mask, self.config.pad_token_id, B, T, hidden.device)
        pooled = hidden[torch.arange(B, device=hidden.device), last]  # (B, C)
        logits = self.score(pooled)  # (B, num_labels)
        if labels is not None:
            labels = checked_class_labels(labels, self.num_labels)
            return F.cross_entropy(logits.float(), labels)
        return logits


def last_token_index(input_ids, attention_mask, pad_token_id, B, T, device):
    """Index (B,) of each sequence's last real token: the rightmost position of the attention mask, or, as
    transformers does, the rightmost token that is not pad_token_id."""
    positions = torch.arange(T, device=device)
    if attention_mask is not None:
        real = attention_mask.bool()
    elif pad_token_id is not None and input_ids is not None:
        real = input_ids != pad_token_id
    else:
        if B > 1 and input_ids is None:
            raise ValueError("pass an attention_mask so the classifier can find each sequence's last token")
        return torch.full((B,), T - 1, device=device)
    return (positions * real).argmax(-1)


def count_parameters(model: nn.Module):
    """(trainable, total) parameter counts; shared (tied) parameters are counted once. Works on meta.

    Modules that hold frozen weights outside parameters (4-bit quantized linears) report them through a
    `num_quantized_parameters()` method so that the total still counts them.
    """
    trainable = total = 0
    for p in model.parameters():
        if not p.is_floating_point():  # a 4-bit layer's codes held as uint8 parameters (sharded): counted below
            continue
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    for module in model.modules():
        if hasattr(module, "num_quantized_parameters"):
            total += module.num_quantized_parameters()
    return trainable, total
