"""GPT-Neo (EleutherAI/gpt-neo-125M) as a variant of the one GPT-2 model, with Hugging Face's module names.

GPT-Neo is GPT-2 with three differences, and only those are written here:
- attention has separate q/k/v projections without bias and an `out_proj` with bias, nested one level deeper
  than GPT-2's (`h[i].attn.attention.q_proj`, as in transformers, so peft adapter keys line up);
- attention scores are not divided by sqrt(head_dim) (`scale_attn=False`). transformers computes them in
  float32 because unscaled scores overflow float16; F.scaled_dot_product_attention already does (its fused
  kernels accumulate in float32 and its math backend upcasts half inputs unless
  torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(True) is set), so nothing more is needed here;
- layers alternate global and local attention (a 256-token window): `GPT2Config.attention_windows`.

Everything else (embeddings, blocks, MLP, masks, KV cache, generation, LM and classification heads, loading,
saving, adapters) is the GPT-2 code; architectures.py's GPT_NEO_ARCHITECTURE record points it at the pieces
here (the attention class, the config.json mapping; its presets are in config.py). A model is built, loaded and fine-tuned exactly like GPT-2:

    model = gpt2lite.GPT2.from_pretrained("EleutherAI/gpt-neo-125M")        # or a local directory
    model = gpt2lite.GPT2(gpt2lite.GPT2Config.from_name("gpt-neo-125M"))    # random initialisation
"""

from __future__ import annotations

from typing import List

import torch.nn as nn

from gpt2lite.model.config import GPT_NEO_MODEL_TYPE, GPT2Config
from gpt2lite.errors import CheckpointError
from gpt2lite.model.config_json import first_id, hf_num_labels
from gpt2lite.model.attention import CausalSelfAttention

MODEL_TYPE = GPT_NEO_MODEL_TYPE


class GPTNeoSelfAttention(CausalSelfAttention):
    """GPT-Neo's attention: q_proj, k_proj, v_proj (no bias), out_proj (bias); scores unscaled."""

    def build_projections(self, config: GPT2Config):
        self.q_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.k_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.v_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.out_proj = nn.Linear(config.n_embd, config.n_embd, bias=True)

    def project_qkv(self, x):
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)  # each (B, T, C)

    def project_out(self, y):
        return self.resid_dropout(self.out_proj(y))


class GPTNeoAttention(nn.Module):
    """The `attn` of a GPT-Neo block: a container whose `attention` child does the work (HF's nesting)."""

    def __init__(self, config: GPT2Config, layer_idx: int):
        super().__init__()
        self.attention = GPTNeoSelfAttention(config, layer_idx)

    def forward(self, x, mask=None, kv_cache=None):
        return self.attention(x, mask, kv_cache)


# ---------------------------------------------------------------------------------------------- config.json


def expand_attention_types(attention_types) -> List[str]:
    """[[["global", "local"], 6]] -> ["global", "local", "global", ...] (12 entries), as transformers does."""
    layers = []
    for pattern, repeats in attention_types:
        layers.extend(list(pattern) * repeats)
    return layers


def compress_attention_layers(layers: List[str]) -> list:
    """The inverse of expand_attention_types: the shortest repeating pattern, e.g. [[["global", "local"], 6]]."""
    n = len(layers)
    for period in range(1, n):
        if n % period == 0 and layers == layers[:period] * (n // period):
            return [[layers[:period], n // period]]
    return [[list(layers), 1]]


def config_from_hf(d: dict) -> GPT2Config:
    """GPT2Config from a GPT-Neo config.json."""
    if "attention_types" in d and d["attention_types"] is not None:
        layers = expand_attention_types(d["attention_types"])
    else:
        layers = d.get("attention_layers") or ["global", "local"] * (d["num_layers"] // 2)
    if len(layers) != d["num_layers"]:
        raise CheckpointError(
            f"config.json: attention_types give {len(layers)} layers, num_layers is {d['num_layers']}")
    unknown = sorted(set(layers) - {"global", "local"})
    if unknown:
        raise CheckpointError(f"config.json: attention types {unknown} are unknown; GPT-Neo has 'global' and 'local'")
    window = d.get("window_size", 256)
    return GPT2Config(
        model_type=MODEL_TYPE, scale_attn=False,
        attention_windows=tuple(window if kind == "local" else None for kind in layers),
        vocab_size=d["vocab_size"], n_positions=d.get("max_position_embeddings", 2048), n_embd=d["hidden_size"],
        n_layer=d["num_layers"], n_head=d["num_heads"], n_inner=d.get("intermediate_size"),
        activation_function=d.get("activation_function", "gelu_new"),
        layer_norm_epsilon=d.get("layer_norm_epsilon", 1e-5), embd_pdrop=float(d.get("embed_dropout", 0.0)),
        attn_pdrop=float(d.get("attention_dropout", 0.0)), resid_pdrop=float(d.get("resid_dropout", 0.0)),
        initializer_range=d.get("initializer_range", 0.02), tie_word_embeddings=d.get("tie_word_embeddings", True),
        bos_token_id=first_id(d.get("bos_token_id", 50256)), eos_token_id=first_id(d.get("eos_token_id", 50256)),
        pad_token_id=d.get("pad_token_id"), num_labels=hf_num_labels(d),
    )


def config_to_hf(c: GPT2Config) -> dict:
    """A GPT-Neo config.json for transformers' GPTNeoConfig."""
    if c.scale_attn:
        raise CheckpointError("a gpt_neo config must have scale_attn=False: GPT-Neo never scales attention scores")
    windows = [c.window(i) for i in range(c.n_layer)]
    sizes = sorted({w for w in windows if w is not None})
    if len(sizes) > 1:
        raise CheckpointError(f"GPT-Neo has one local window size for every layer; this config has {sizes}")
    layers = ["global" if w is None else "local" for w in windows]
    return dict(
        model_type=MODEL_TYPE, vocab_size=c.vocab_size, max_position_embeddings=c.n_positions,
        hidden_size=c.n_embd, num_layers=c.n_layer, num_heads=c.n_head, intermediate_size=c.n_inner,
        attention_types=compress_attention_layers(layers), window_size=sizes[0] if sizes else 256,
        activation_function=c.activation_function, layer_norm_epsilon=c.layer_norm_epsilon,
        embed_dropout=c.embd_pdrop, attention_dropout=c.attn_pdrop, resid_dropout=c.resid_pdrop,
        initializer_range=c.initializer_range, tie_word_embeddings=c.tie_word_embeddings,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
    )
