"""One entry point that switches fine-tuning method by name: `apply(model, MethodConfig(...) or dict)`.

    apply(model, {"name": "lora", "rank": 8, "alpha": 16, "targets": ["c_attn"]})

Afterwards exactly the method's parameters are trainable. For a GPT2ForSequenceClassification the new
`score` head stays trainable, as peft does for SEQ_CLS tasks: LoRA, QLoRA, prompt, prefix and IA3 put it in
modules_to_save (saved with the adapter, the frozen original kept beside the copy, as in peft, so counts
equal peft's); "frozen" becomes a linear probe; last_n and bitfit train it in place.

QLoRA quantizes the model's block linears, or takes them as they are when the model was quantized as it
loaded (`GPT2.from_pretrained(path, **MethodConfig(name="qlora").load_options())`, which never holds the
float model).

An option of another method is refused (`rank` with "prompt"): it would be silently ignored otherwise.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Tuple, Union

import torch.nn as nn

from gpt2lite.model.architectures import default_targets
from gpt2lite.dtypes import DTYPES
from gpt2lite.peft.adapter import is_classifier
from gpt2lite.peft.freeze import LM_HEAD_CHOICES, add_bitfit, freeze_layers, frozen_baseline, full_finetuning
from gpt2lite.peft.lora.add import BIAS_MODES, add_lora

METHODS = ("full", "frozen", "lora", "qlora", "prompt", "prefix", "last_n", "bitfit", "ia3")


def option(default: Any, *methods: str):
    """A MethodConfig field that only `methods` read."""
    return field(default=default, metadata={"methods": methods})


@dataclass(frozen=True)
class MethodConfig:
    """A fine-tuning method and its options; an option of another method is refused."""

    name: str
    rank: int = option(8, "lora", "qlora")
    alpha: float = option(16.0, "lora", "qlora")
    dropout: float = option(0.0, "lora", "qlora")
    # None: the architecture's (GPT-2: c_attn; GPT-Neo: q_proj, v_proj)
    targets: Optional[Tuple[str, ...]] = option(None, "lora", "qlora")
    bias: str = option("none", "lora", "qlora")  # "none" | "all" | "lora_only"
    rslora: bool = option(False, "lora", "qlora")
    dora: bool = option(False, "lora", "qlora")
    layers_to_transform: Optional[Tuple[int, ...]] = option(None, "lora", "qlora")
    modules_to_save: Optional[Tuple[str, ...]] = option(None, "lora", "qlora")  # classifiers add "score" themselves
    compute_dtype: str = option("float32", "qlora")  # "float32" | "bfloat16" | "float16"
    double_quant: bool = option(True, "qlora")
    n_tokens: int = option(20, "prompt", "prefix")
    init_text: Optional[str] = option(None, "prompt")
    projection: bool = option(False, "prefix")  # prefix tuning's MLP reparametrisation
    n_layers: int = option(2, "last_n")
    head: Optional[str] = option(None, "last_n")  # see freeze.freeze_layers

    def __post_init__(self):
        if self.name not in METHODS:
            raise ValueError(f"unknown method {self.name!r}; choose one of {METHODS}")
        if self.compute_dtype not in DTYPES:
            raise ValueError(f"compute_dtype must be one of {sorted(DTYPES)}, got {self.compute_dtype!r}")
        for name in ("targets", "layers_to_transform", "modules_to_save"):  # lists from JSON/YAML -> tuples
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
            elif isinstance(value, (str, int)) and not isinstance(value, bool):
                object.__setattr__(self, name, (value,))
        changed = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                   if f.name != "name" and getattr(self, f.name) != f.default}
        refuse_other_options(self.name, changed)
        check_values(self)

    def load_options(self) -> dict:
        """from_pretrained's options for this method's base model: QLoRA's quantize-on-load (quantize="nf4",
        compute_dtype, double_quant), so that the float model is never held; {} for every other method."""
        if self.name != "qlora":
            return {}
        return {"quantize": "nf4", "compute_dtype": self.compute_dtype, "double_quant": self.double_quant}

    @classmethod
    def from_value(cls, value: Union["MethodConfig", dict, str]) -> "MethodConfig":
        """A MethodConfig from itself, a dict of fields, or a bare method name."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            return cls(name=value)
        if isinstance(value, dict):
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(value) - known)
            if unknown:
                raise ValueError(f"unknown method option(s) {unknown}; MethodConfig has {sorted(known)}")
            if value.get("name") in METHODS:  # options given at their default values are refused too
                refuse_other_options(value["name"], {k: v for k, v in value.items() if k != "name"})
            return cls(**value)
        raise TypeError(f"method_config must be a MethodConfig, a dict or a method name, got {type(value).__name__}")


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_values(config: MethodConfig):
    """Raise a ValueError for the first option with a value no model could take (rank 0, dropout 1.5, ...),
    so that a bad setting fails when the config is built, before any data or model work. What depends on
    the model (targets that match no module, layers or tokens beyond its size) is checked by apply()."""
    problems = [
        (not _integer(config.rank) or config.rank < 1, f"rank must be a positive integer, got {config.rank!r}"),
        (isinstance(config.alpha, bool) or not isinstance(config.alpha, (int, float)) or not config.alpha > 0,
         f"alpha must be a positive number, got {config.alpha!r}"),
        (isinstance(config.dropout, bool) or not isinstance(config.dropout, (int, float))
         or not 0 <= config.dropout < 1, f"dropout must be in [0, 1), got {config.dropout!r}"),
        (config.bias not in BIAS_MODES, f"bias must be one of {BIAS_MODES}, got {config.bias!r}"),
        (config.targets is not None and (not config.targets or not all(isinstance(t, str) and t for t in
                                                                        config.targets)),
         f"targets must be None (the architecture's) or module names such as ['c_attn'], got {config.targets!r}"),
        (config.layers_to_transform is not None and (not config.layers_to_transform or not all(
            _integer(i) and i >= 0 for i in config.layers_to_transform)),
         f"layers_to_transform must be None or block indices >= 0, got {config.layers_to_transform!r}"),
        (config.modules_to_save is not None and not all(isinstance(m, str) and m for m in config.modules_to_save),
         f"modules_to_save must be None or module names such as ['score'], got {config.modules_to_save!r}"),
        (not _integer(config.n_tokens) or config.n_tokens < 1,
         f"n_tokens must be a positive integer, got {config.n_tokens!r}"),
        (config.init_text is not None and not (isinstance(config.init_text, str) and config.init_text.strip()),
         f"init_text must be None or a few words describing the task, got {config.init_text!r}"),
        (not _integer(config.n_layers) or config.n_layers < 0,
         f"n_layers must be an integer >= 0, got {config.n_layers!r}"),
        (config.head is not None and config.head not in LM_HEAD_CHOICES + ("score",),
         f"head must be None or one of {LM_HEAD_CHOICES + ('score',)}, got {config.head!r}"),
    ]
    for bad, message in problems:
        if bad:
            raise ValueError(f"method {config.name!r}: {message}")


def refuse_other_options(method: str, options: Mapping[str, Any]):
    """Raise a ValueError naming each option in `options` that `method` does not read."""
    readers = {f.name: f.metadata.get("methods", ()) for f in dataclasses.fields(MethodConfig)}
    foreign = [f"{key}={value!r} (an option of {' and '.join(readers[key])})" for key, value in options.items()
               if method not in readers[key]]
    if foreign:
        own = [key for key, methods in readers.items() if method in methods]
        raise ValueError(f"method {method!r} does not read {', '.join(foreign)}; remove it, or choose that method. "
                         f"{method!r} takes {own or 'no options'}")


def apply(model: nn.Module, method_config: Union[MethodConfig, dict, str]) -> nn.Module:
    """Prepare `model` for fine-tuning with the named method; returns the model."""
    config = MethodConfig.from_value(method_config)
    name = config.name
    if name == "full":
        return full_finetuning(model)
    if name == "frozen":
        return frozen_baseline(model)
    if name == "last_n":
        return freeze_layers(model, last_n=config.n_layers, head=config.head)
    if name == "bitfit":
        return add_bitfit(model)
    if name in ("lora", "qlora"):
        if name == "qlora":
            from gpt2lite.quantization.linear import quantize_unless_quantized

            quantize_unless_quantized(model, DTYPES[config.compute_dtype], config.double_quant)
        saved = list(config.modules_to_save or ())
        if is_classifier(model) and "score" not in saved:
            saved.append("score")
        targets = list(config.targets) if config.targets else list(default_targets(model, "lora"))
        return add_lora(model, rank=config.rank, alpha=config.alpha, targets=targets,
                        dropout=config.dropout, bias=config.bias, rslora=config.rslora, dora=config.dora,
                        layers_to_transform=config.layers_to_transform, modules_to_save=saved or None)
    if name == "prompt":
        from gpt2lite.peft.prompt import add_soft_prompt

        return add_soft_prompt(model, n_tokens=config.n_tokens, init_text=config.init_text)
    if name == "prefix":
        from gpt2lite.peft.prefix import add_prefix

        return add_prefix(model, n_tokens=config.n_tokens, projection=config.projection)
    from gpt2lite.peft.ia3 import add_ia3

    return add_ia3(model)
