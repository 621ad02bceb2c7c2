"""Model configuration: a small frozen dataclass with named presets.

Field names follow Hugging Face's GPT-2 config.json (n_embd, n_layer, ...), so converting between the two
is a dictionary lookup, not a translation table.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

ACTIVATIONS = ("gelu_new", "gelu", "relu", "gelu_pytorch_tanh")


@dataclass(frozen=True)
class GPT2Config:
    vocab_size: int = 50257
    n_positions: int = 1024  # context length
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: Optional[int] = None  # MLP width; None means 4 * n_embd
    activation_function: str = "gelu_new"  # GPT-2's tanh approximation of GELU
    layer_norm_epsilon: float = 1e-5
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    resid_pdrop: float = 0.1
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True
    bos_token_id: int = 50256
    eos_token_id: int = 50256
    pad_token_id: Optional[int] = None  # used by sequence classification to find the last real token
    num_labels: Optional[int] = None  # set for sequence classification models
    # Architecture switches. GPT-2 uses the defaults; other GPT-2-like models (GPT-Neo) change them.
    model_type: str = "gpt2"
    scale_attn: bool = True  # divide attention scores by sqrt(head_dim)
    attention_windows: Optional[tuple] = None  # per layer: None (global) or a window size (local attention)

    def __post_init__(self):
        def bad(message):
            raise ValueError(f"GPT2Config: {message}")

        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                bad(f"{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            bad(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_inner is not None and self.n_inner <= 0:
            bad(f"n_inner must be positive or None, got {self.n_inner}")
        if self.activation_function not in ACTIVATIONS:
            bad(f"activation_function {self.activation_function!r} is not one of {ACTIVATIONS}")
        for name in ("embd_pdrop", "attn_pdrop", "resid_pdrop"):
            if not 0.0 <= getattr(self, name) < 1.0:
                bad(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.num_labels is not None and self.num_labels <= 0:
            bad(f"num_labels must be positive, got {self.num_labels}")
        if self.attention_windows is not None:
            if len(self.attention_windows) != self.n_layer:
                bad(f"attention_windows has {len(self.attention_windows)} entries for {self.n_layer} layers")
            if any(w is not None and (not isinstance(w, int) or w <= 0) for w in self.attention_windows):
                bad(f"attention_windows entries must be None or positive ints, got {self.attention_windows}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_dim(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    def window(self, layer: int) -> Optional[int]:
        """The local-attention window of a layer, or None for global attention."""
        return None if self.attention_windows is None else self.attention_windows[layer]

    def replace(self, **changes) -> "GPT2Config":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_name(cls, name: str, **overrides) -> "GPT2Config":
        """A preset by name: gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2, tiny (for tests), demo (the
        offline demo's pretrained base), gpt-neo-125M and gpt-neo-tiny (PRESETS below)."""
        key = name.split("/")[-1]  # "openai-community/gpt2-medium" -> "gpt2-medium"
        if key not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[key], **overrides})


GPT_NEO_MODEL_TYPE = "gpt_neo"


def neo_preset(n_layer: int, n_head: int, n_embd: int, window: int, n_positions: int = 2048) -> dict:
    """GPT2Config fields of a GPT-Neo model with alternating global and local layers (no dropout, as released)."""
    return dict(
        model_type=GPT_NEO_MODEL_TYPE, scale_attn=False, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
        n_positions=n_positions, attention_windows=tuple(None if i % 2 == 0 else window for i in range(n_layer)),
        embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0,
    )


GPT2_PRESETS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    "distilgpt2": dict(n_layer=6, n_head=12, n_embd=768),  # 82M
    "tiny": dict(n_layer=2, n_head=4, n_embd=64, n_positions=256),  # for tests; real vocabulary
    # the offline demo's base, pretrained in minutes on two cores (gpt2lite/experiment/pretrain.py); no dropout: it
    # sees its small corpus about once
    "demo": dict(n_layer=4, n_head=4, n_embd=192, n_positions=128, embd_pdrop=0.0, attn_pdrop=0.0,
                 resid_pdrop=0.0),
}

GPT_NEO_PRESETS = {  # as released on the Hub; a tiny one for tests
    "gpt-neo-125M": neo_preset(n_layer=12, n_head=12, n_embd=768, window=256),
    "gpt-neo-tiny": neo_preset(n_layer=4, n_head=4, n_embd=64, window=8, n_positions=256),
}

PRESETS = {**GPT2_PRESETS, **GPT_NEO_PRESETS}  # every architecture's, by name (GPT2Config.from_name)
