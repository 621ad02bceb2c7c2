"""Everything that differs between the architectures gpt2lite runs, one `Architecture` record each.

The model (model.py), the Hugging Face bridge (hf.py), the presets (GPT2Config.from_name) and the
adaptation methods (gpt2lite.peft) are written once; where an architecture matters they look it up here by
`config.model_type`. Adding an architecture is one record in ARCHITECTURES, nothing registered elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Type

import torch.nn as nn

from gpt2lite.model import gpt_neo
from gpt2lite.model.attention import CausalSelfAttention
from gpt2lite.model.config import GPT2_PRESETS, GPT_NEO_PRESETS, GPT2Config
from gpt2lite.errors import CheckpointError
from gpt2lite.model.config_json import gpt2_config_from_hf, gpt2_config_to_hf


@dataclass(frozen=True)
class Architecture:
    model_type: str  # config.json's model_type
    attention_class: Type[nn.Module]  # a block's `attn`, built as attention_class(config, layer_idx)
    config_from_hf: Callable[[dict], GPT2Config]  # config.json -> GPT2Config
    config_to_hf: Callable[[GPT2Config], dict]  # GPT2Config -> config.json
    transposed: tuple = ()  # key suffixes of weights stored as (in, out)
    ignored: tuple = ()  # regexes of checkpoint keys that are buffers, not weights
    hf_class_names: Dict[str, str] = field(default_factory=dict)  # our class name -> transformers' class
    # module-name patterns a fine-tuning method adapts when none are given, as peft's per-model_type
    # TRANSFORMERS_MODELS_TO_*_TARGET_MODULES_MAPPING: "lora", "ia3", "ia3_feedforward", "quantize" (QLoRA)
    default_targets: Dict[str, tuple] = field(default_factory=dict)
    presets: Dict[str, dict] = field(default_factory=dict)  # GPT2Config.from_name(name): GPT2Config fields


GPT2_ARCHITECTURE = Architecture(
    model_type="gpt2",
    attention_class=CausalSelfAttention,
    config_from_hf=gpt2_config_from_hf,
    config_to_hf=gpt2_config_to_hf,
    transposed=("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"),  # Conv1D
    ignored=(r"\.attn\.bias$", r"\.attn\.masked_bias$"),
    hf_class_names={"GPT2": "GPT2LMHeadModel", "GPT2ForSequenceClassification": "GPT2ForSequenceClassification"},
    default_targets={"lora": ("c_attn",), "ia3": ("c_attn", "mlp.c_proj"), "ia3_feedforward": ("mlp.c_proj",),
                     "quantize": ("c_attn", "c_proj", "c_fc")},
    presets=GPT2_PRESETS,
)

GPT_NEO_ARCHITECTURE = Architecture(
    model_type=gpt_neo.MODEL_TYPE,
    attention_class=gpt_neo.GPTNeoAttention,
    config_from_hf=gpt_neo.config_from_hf,
    config_to_hf=gpt_neo.config_to_hf,
    transposed=(),  # GPT-Neo stores plain Linear weights
    ignored=(r"\.attn\.attention\.bias$", r"\.attn\.attention\.masked_bias$"),  # mask buffers of old checkpoints
    hf_class_names={"GPT2": "GPTNeoForCausalLM", "GPT2ForSequenceClassification": "GPTNeoForSequenceClassification"},
    default_targets={  # peft's mappings for gpt_neo; "quantize" is every linear layer of the blocks
        "lora": ("q_proj", "v_proj"), "ia3": ("q_proj", "v_proj", "c_proj"), "ia3_feedforward": ("c_proj",),
        "quantize": ("q_proj", "k_proj", "v_proj", "out_proj", "c_fc", "c_proj"),
    },
    presets=GPT_NEO_PRESETS,
)

ARCHITECTURES: Dict[str, Architecture] = {arch.model_type: arch for arch in (GPT2_ARCHITECTURE, GPT_NEO_ARCHITECTURE)}


def architecture(model_type: str) -> Architecture:
    """The record of a config.json / GPT2Config model_type; CheckpointError naming the known ones otherwise."""
    if model_type not in ARCHITECTURES:
        raise CheckpointError(f"model_type {model_type!r} is not supported; gpt2lite knows {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[model_type]


def stores_transposed(model) -> bool:
    """Whether transformers stores this model's linear weights as (in, out) (Conv1D): peft's fan_in_fan_out."""
    return bool(architecture(model.config.model_type).transposed)


def default_targets(model, method: str) -> tuple:
    """The module-name patterns `method` ("lora", "ia3", "ia3_feedforward", "quantize") adapts by default
    on this model's architecture: ("c_attn",) for GPT-2's LoRA, ("q_proj", "v_proj") for GPT-Neo's."""
    arch = architecture(model.config.model_type)
    if method not in arch.default_targets:
        raise ValueError(f"no default targets for {method!r} on {arch.model_type}; pass the module names explicitly "
                         f"(defaults exist for {sorted(arch.default_targets)})")
    return arch.default_targets[method]
