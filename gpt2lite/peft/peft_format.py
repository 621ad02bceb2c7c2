"""peft's adapter format for every method: the fields of adapter_config.json and the names of the tensors.

    method       peft_type      tensors in adapter_model.safetensors
    LoRA, DoRA   LORA           base_model.model.<module>.lora_A.weight (r, in), .lora_B.weight (out, r),
                                .lora_magnitude_vector (out,) with DoRA; the biases of the bias mode as
                                <module>.base_layer.bias in a LoRA layer, <module>.bias elsewhere
    soft prompt  PROMPT_TUNING  prompt_embeddings (n, n_embd)
    prefix       PREFIX_TUNING  prompt_embeddings (n, n_layer * 2 * n_embd); a projected prefix saves the
                                MLP's output, as peft does, and so loads back as a plain table
    IA3          IA3            base_model.model.<module>.ia3_l, (out, 1), or (1, in) for a feed-forward one

A modules_to_save copy (a classifier's score head) is saved under its module's own name after the method's
prefix: base_model.model.score.weight (base_model.score.weight for prompt learning). gpt2lite keeps Hugging
Face's module names, so the mapping is this short. LoRA matrices have the same orientation in both
(A: (r, in), B: (out, r)) although transformers' GPT-2 stores its linear layers transposed (Conv1D): peft
records that as fan_in_fan_out=true.

Each method is a PeftFormat: LoRA's and IA3's here, soft prompts' and prefixes' (peft's "prompt learning",
a table of virtual tokens) in prompt_learning_format.py. save_adapter and load_adapter (adapter_io.py), the
one writer and the one reader, use them.
"""

from __future__ import annotations

import os
import re
from typing import Dict

import torch
import torch.nn as nn

from gpt2lite.model.architectures import stores_transposed
from gpt2lite.errors import CheckpointError
from gpt2lite.peft.adapter import classifier_head_parameters
from gpt2lite.peft.ia3 import add_ia3_layers, ia3_layers
from gpt2lite.model.surgery import select_modules
from gpt2lite.peft.lora.layer import DoRALinear, LoRALinear
from gpt2lite.peft.lora.add import add_lora, lora_biases, lora_layers
from gpt2lite.peft.modules_to_save import modules_to_save_of

PREFIX = "base_model.model."


class PeftFormat:
    """One method's adapter in peft's files:

        is_applied(model)   whether the model has this method's adapter
        config(model)       its adapter_config.json, a dict
        tensors(model)      its tensors under peft's names; loading copies the file's values into these same tensors
        check_config(model, path, config), check_file(model, path, config, saved)
                            refuse, naming the file at `path`, what cannot fit, before anything changes
        add(model, path, config, saved)
                            add the adapter the config describes, unless the model has one that can take it
        hint(model)         the likely cause when the file's tensors do not fit the model's
    """

    peft_type = ""
    head_prefix = PREFIX  # where modules_to_save copies are saved
    float32 = True  # write in float32, as peft keeps the adapters of a 16-bit base

    def check_config(self, model: nn.Module, path: str, config: dict):
        pass

    def check_file(self, model: nn.Module, path: str, config: dict, saved: Dict[str, torch.Tensor]):
        pass


def peft_tensors(model: nn.Module, method: PeftFormat) -> Dict[str, torch.Tensor]:
    """Every tensor of the model's adapter under peft's names: the method's, then the modules_to_save copies."""
    tensors = method.tensors(model)
    for name, wrapper in modules_to_save_of(model).items():
        for key, tensor in wrapper.adapter_state_dict().items():
            tensors[f"{method.head_prefix}{name}.{key}"] = tensor
    return tensors


def task_type(model: nn.Module) -> str:
    """peft's task_type: SEQ_CLS for a classifier, CAUSAL_LM for a language model. peft's Auto classes
    (AutoPeftModelForSequenceClassification, AutoPeftModelForCausalLM) choose the model class by it."""
    return "SEQ_CLS" if classifier_head_parameters(model) else "CAUSAL_LM"


def score_head_hint(model: nn.Module) -> str:
    if classifier_head_parameters(model):
        return f"a classifier's adapter holds its score head ({model.config.num_labels} labels here)"
    return "a classifier's adapter (with score.*) loads into a GPT2ForSequenceClassification"


def classifier_modules_to_save(model: nn.Module):
    """What peft writes as modules_to_save for a SEQ_CLS adapter of any method but LoRA, or None."""
    return ["classifier", "score"] if classifier_head_parameters(model) else None


# --- LoRA ---------------------------------------------------------------------------------------------


class LoRAFormat(PeftFormat):
    peft_type = "LORA"
    float32 = False  # A and B are float32 already; biases and modules_to_save copies keep the base's dtype

    def is_applied(self, model):
        return bool(lora_layers(model))

    def config(self, model):
        settings = model.lora_settings
        layers = settings["layers_to_transform"]
        return {
            "peft_type": "LORA", "task_type": task_type(model),
            "base_model_name_or_path": None, "r": settings["rank"], "lora_alpha": settings["alpha"],
            "target_modules": list(settings["targets"]), "lora_dropout": settings["dropout"],
            "bias": settings["bias"], "use_rslora": settings["rslora"], "use_dora": settings["dora"],
            "layers_to_transform": [layers] if isinstance(layers, int) else (None if layers is None else list(layers)),
            "modules_to_save": settings["modules_to_save"],
            "fan_in_fan_out": stores_transposed(model),  # GPT-2's Conv1D: (in, out) weights; GPT-Neo: Linear
            "init_lora_weights": True, "inference_mode": True,
        }

    def tensors(self, model):
        state = {}
        for name, layer in lora_layers(model).items():
            state[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight
            state[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight
            if isinstance(layer, DoRALinear):
                state[f"{PREFIX}{name}.lora_magnitude_vector"] = layer.lora_magnitude_vector
        for name, bias in lora_biases(model, model.lora_settings["bias"]):
            inside_lora = isinstance(model.get_submodule(name), LoRALinear)
            state[f"{PREFIX}{name}{'.base_layer' if inside_lora else ''}.bias"] = bias
        return state

    def check_config(self, model, path, config):
        lora_arguments(model, path, config)

    def add(self, model, path, config, saved):
        settings = lora_arguments(model, path, config)
        layers = lora_layers(model)
        if not layers:
            try:
                add_lora(model, **settings)
            except (ValueError, TypeError) as error:
                raise CheckpointError(f"{path}: {error}") from None
            return
        ranks = {layer.rank for layer in layers.values()}
        if ranks != {settings["rank"]}:
            raise CheckpointError(f"the adapter in {os.path.dirname(path)!r} has rank {settings['rank']}, the model's "
                                  f"LoRA layers have rank {sorted(ranks)}; load it into a model without LoRA or "
                                  "with the same rank")

    def hint(self, model):
        return (f"the adapter was made for another base size (n_embd={model.config.n_embd} here), rank or set of "
                "target modules")


def lora_arguments(model: nn.Module, path: str, config: dict) -> dict:
    """add_lora's arguments from a peft LoraConfig (peft's defaults where a field is absent); a CheckpointError
    naming the file for what gpt2lite does not implement or a config without target_modules."""
    for unsupported in ("rank_pattern", "alpha_pattern"):
        if config.get(unsupported):
            raise CheckpointError(f"{path} sets {unsupported}={config[unsupported]}; gpt2lite uses one rank and alpha")
    if config.get("lora_bias"):
        raise CheckpointError(f"{path} sets lora_bias=true (a bias on lora_B), which gpt2lite does not implement")
    targets = config.get("target_modules")
    if not targets:
        raise CheckpointError(f"{path} has no target_modules: a LoRA adapter names the layers it adapts "
                              '(e.g. "target_modules": ["c_attn"])')
    if isinstance(targets, str):  # peft: a string is a regular expression over full module names
        pattern = targets
        targets = [n for n, m in model.named_modules() if re.fullmatch(pattern, n) and isinstance(m, nn.Linear)]
        if not targets:
            raise CheckpointError(f"{path}: target_modules {pattern!r} (a regular expression over module "
                                  "names) matches no linear layer of this model")
    return dict(rank=config.get("r", 8), alpha=config.get("lora_alpha", 8), targets=targets,
                dropout=config.get("lora_dropout", 0.0), bias=config.get("bias", "none"),
                rslora=config.get("use_rslora", False), dora=config.get("use_dora", False),
                layers_to_transform=config.get("layers_to_transform"), modules_to_save=config.get("modules_to_save"))


# --- IA3 -----------------------------------------------------------------------------------------------


class IA3Format(PeftFormat):
    peft_type = "IA3"

    def is_applied(self, model):
        return bool(ia3_layers(model))

    def config(self, model):
        layers = ia3_layers(model)
        return {
            "peft_type": "IA3", "task_type": task_type(model), "target_modules": list(layers),
            "feedforward_modules": [n for n, m in layers.items() if m.feedforward],
            "fan_in_fan_out": stores_transposed(model), "init_ia3_weights": True, "inference_mode": True,
            "base_model_name_or_path": None, "revision": None, "modules_to_save": classifier_modules_to_save(model),
            "exclude_modules": None, "auto_mapping": None,
        }

    def tensors(self, model):
        return {f"{PREFIX}{name}.ia3_l": m.ia3_l.view(1, -1) if m.feedforward else m.ia3_l.view(-1, 1)
                for name, m in ia3_layers(model).items()}

    def check_config(self, model, path, config):
        if not config.get("target_modules"):
            raise CheckpointError(f"{path} has no target_modules: an IA3 adapter names the layers it scales "
                                  '(e.g. "target_modules": ["c_attn", "mlp.c_proj"])')

    def add(self, model, path, config, saved):
        if self.is_applied(model):
            return
        try:
            names = select_modules(model, config["target_modules"])
            feedforward = select_modules(model, config.get("feedforward_modules") or [], among=names)
            add_ia3_layers(model, names, set(feedforward))
        except (ValueError, TypeError) as error:
            raise CheckpointError(f"{path}: {error}") from None

    def hint(self, model):
        return "the adapter was made for another model size or set of target modules? " + score_head_hint(model)
