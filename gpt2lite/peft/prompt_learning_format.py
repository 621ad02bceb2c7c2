"""peft's format for prompt learning (peft_type PROMPT_TUNING and PREFIX_TUNING): one table "prompt_embeddings",
a row per virtual token, in adapter_model.safetensors, and modules_to_save copies under "base_model.".

    soft prompt  prompt_embeddings (n, n_embd)
    prefix       prompt_embeddings (n, n_layer * 2 * n_embd); a projected prefix saves the MLP's output, as
                 peft does, and so loads back as a plain table

The other methods' formats, and PeftFormat, the protocol these follow, are in peft_format.py.
"""

from __future__ import annotations

from typing import Type

from gpt2lite.errors import CheckpointError
from gpt2lite.peft.peft_format import PeftFormat, classifier_modules_to_save, score_head_hint, task_type
from gpt2lite.peft.prefix import Prefix, add_prefix
from gpt2lite.peft.prompt import SoftPrompt, add_soft_prompt
from gpt2lite.peft.virtual_tokens import VirtualTokens

PEFT_INIT_NAMES = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}


class PromptLearningFormat(PeftFormat):
    """A table "prompt_embeddings" (n, width), one row per virtual token."""

    head_prefix = "base_model."
    module_class: Type[VirtualTokens] = VirtualTokens
    noun = ""  # "prompt" or "prefix", in messages
    add_to = None  # add_soft_prompt or add_prefix: (model, n_tokens) -> model

    def is_applied(self, model):
        return self.module_class.of(model) is not None

    def config(self, model):
        config = model.config
        return {
            "peft_type": self.peft_type, "task_type": task_type(model),
            "num_virtual_tokens": self.module_class.of(model).n_tokens, "token_dim": config.n_embd,
            "num_layers": config.n_layer, "num_attention_heads": config.n_head, "num_transformer_submodules": 1,
            "inference_mode": True, "base_model_name_or_path": None, "revision": None, "auto_mapping": None,
            "modules_to_save": classifier_modules_to_save(model),
        }

    def tensors(self, model):
        return {"prompt_embeddings": self.module_class.of(model).embedding}

    def table_width(self, model) -> int:
        return model.config.n_embd

    def check_config(self, model, path, config):
        ours = model.config
        for key, value in (("token_dim", ours.n_embd), ("num_layers", ours.n_layer),
                           ("num_attention_heads", ours.n_head), ("num_transformer_submodules", 1)):
            theirs = config.get(key, value)
            if theirs != value:
                raise CheckpointError(f"{path}: the adapter was made for {key}={theirs}, this model has {key}={value}: "
                                      "load it into the base model it was trained on")

    def check_file(self, model, path, config, saved):
        table, width, n = saved.get("prompt_embeddings"), self.table_width(model), config.get("num_virtual_tokens")
        if table is None or table.dim() != 2 or table.size(1) != width or (n is not None and table.size(0) != n):
            found = "nothing" if table is None else f"shape {tuple(table.shape)}"
            raise CheckpointError(f"{path}: prompt_embeddings should be ({n if n is not None else 'n'}, {width}), "
                                  f"found {found}: the adapter was made for another model size or is damaged")

    def add(self, model, path, config, saved):
        if not self.is_applied(model):
            self.add_to(model, saved["prompt_embeddings"].size(0))

    def hint(self, model):
        return f"another number of virtual tokens than the model's {self.noun}? " + score_head_hint(model)


class PromptFormat(PromptLearningFormat):
    peft_type = "PROMPT_TUNING"
    module_class, noun, add_to = SoftPrompt, "prompt", staticmethod(add_soft_prompt)

    def config(self, model):
        prompt = SoftPrompt.of(model)
        return {**super().config(model), "prompt_tuning_init": PEFT_INIT_NAMES[prompt.init],
                "prompt_tuning_init_text": prompt.init_text,
                # peft's config requires a tokenizer name with TEXT init; it only reads it when training starts
                "tokenizer_name_or_path": "openai-community/gpt2" if prompt.init == "text" else None,
                "tokenizer_kwargs": None}


class PrefixFormat(PromptLearningFormat):
    peft_type = "PREFIX_TUNING"
    module_class, noun, add_to = Prefix, "prefix", staticmethod(add_prefix)

    def config(self, model):
        prefix = Prefix.of(model)
        return {**super().config(model), "prefix_projection": prefix.transform is not None,
                "encoder_hidden_size": prefix.projection_dim or model.config.n_embd, "init_weights": None}

    def tensors(self, model):
        return {"prompt_embeddings": Prefix.of(model).table()}  # a plain prefix's table is its embedding

    def table_width(self, model):
        return model.config.n_layer * 2 * model.config.n_embd

    def check_file(self, model, path, config, saved):
        super().check_file(model, path, config, saved)
        prefix = Prefix.of(model)
        if prefix is not None and prefix.transform is not None:
            raise CheckpointError(f"{path} holds a prefix table, but the model's prefix has an MLP projection; a "
                                  "table loads only into a plain prefix: load it into a model without a prefix")
