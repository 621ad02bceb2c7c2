"""Hugging Face's config.json as GPT2Config and back: GPT-2's mapping, and the field readers every
architecture's mapping shares (gpt_neo.py has GPT-Neo's).

GPT2Config's field names are GPT-2's config.json names, so GPT-2's mapping is mostly a copy; it refuses the
switches gpt2lite does not implement rather than loading a model that would compute something else.
"""

from __future__ import annotations

from typing import Optional

from gpt2lite.model.config import GPT2Config
from gpt2lite.errors import CheckpointError


def first_id(token_id):
    """A token id from config.json, where some checkpoints store a list of ids: the first one."""
    return token_id[0] if isinstance(token_id, list) else token_id


def hf_num_labels(hf_config: dict) -> Optional[int]:
    """The number of classes of a sequence-classification checkpoint's config.json (from id2label, as
    transformers counts them); None for a language model."""
    architectures = hf_config.get("architectures")
    if "id2label" in hf_config and architectures and any("Classification" in a for a in architectures):
        return len(hf_config["id2label"])
    return hf_config.get("num_labels") if "num_labels" in hf_config else None


def gpt2_config_from_hf(d: dict) -> GPT2Config:
    """GPT2Config from a GPT-2 config.json."""
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if d.get(flag):
            raise CheckpointError(f"config.json sets {flag}=true, which gpt2lite does not implement")
    if d.get("add_cross_attention"):
        raise CheckpointError("config.json sets add_cross_attention=true; gpt2lite has decoder-only GPT-2")
    return GPT2Config(
        vocab_size=d["vocab_size"], n_positions=d["n_positions"], n_embd=d["n_embd"], n_layer=d["n_layer"],
        n_head=d["n_head"], n_inner=d.get("n_inner"),
        activation_function=d.get("activation_function", "gelu_new"),
        layer_norm_epsilon=d.get("layer_norm_epsilon", 1e-5), embd_pdrop=d.get("embd_pdrop", 0.1),
        attn_pdrop=d.get("attn_pdrop", 0.1), resid_pdrop=d.get("resid_pdrop", 0.1),
        initializer_range=d.get("initializer_range", 0.02),
        tie_word_embeddings=d.get("tie_word_embeddings", True),
        bos_token_id=first_id(d.get("bos_token_id", 50256)), eos_token_id=first_id(d.get("eos_token_id", 50256)),
        pad_token_id=d.get("pad_token_id"), num_labels=hf_num_labels(d),
        scale_attn=d.get("scale_attn_weights", True),
    )


def gpt2_config_to_hf(c: GPT2Config) -> dict:
    """A GPT-2 config.json for transformers' GPT2Config."""
    return dict(
        model_type="gpt2", vocab_size=c.vocab_size, n_positions=c.n_positions, n_ctx=c.n_positions,
        n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head, n_inner=c.n_inner,
        activation_function=c.activation_function, layer_norm_epsilon=c.layer_norm_epsilon,
        embd_pdrop=c.embd_pdrop, attn_pdrop=c.attn_pdrop, resid_pdrop=c.resid_pdrop,
        initializer_range=c.initializer_range, tie_word_embeddings=c.tie_word_embeddings,
        scale_attn_weights=c.scale_attn, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id,
    )
