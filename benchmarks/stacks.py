"""The two stacks under test, set up for the same fine-tuning method.

    gpt2lite   gpt2lite.GPT2 + gpt2lite.peft.apply(...); loss = model(input_ids, labels=labels)
    reference  transformers.GPT2LMHeadModel + peft.get_peft_model(...); loss = model(...).loss

Methods (the same settings on both sides):
    full    every parameter trains
    lora    r=8, alpha=16, LoRA dropout 0.05 on modules matching "c_attn" and "c_proj" by peft's suffix
            rule on both sides: attn.c_attn, attn.c_proj and mlp.c_proj of every block (36 layers)
    prompt  20 virtual tokens, random init (peft PromptTuningConfig / gpt2lite add_soft_prompt)
    last2   blocks 10 and 11 and ln_f train (requires_grad); embeddings and the tied head are frozen
    qlora   every block linear in 4-bit NF4 (double quantization), then LoRA as above. gpt2lite quantizes
            while loading when it starts from a checkpoint; the reference (run by scaling.py, not run.py) is
            transformers' bitsandbytes 4-bit loading with peft's prepare_model_for_kbit_training, which needs
            a checkpoint (weights_dir) and bitsandbytes' CPU backend.

This module imports transformers and peft only inside `reference_model`, so gpt2lite's benchmark
processes never load them (their memory would count against gpt2lite's peak).
"""

from __future__ import annotations

import torch

MODES = ("full", "lora", "prompt", "last2", "qlora")
LORA = dict(rank=8, alpha=16.0, dropout=0.05, targets=("c_attn", "c_proj"))
N_VIRTUAL_TOKENS = 20
LAST_N = 2
GPT2LITE_METHODS = {
    "full": {"name": "full"},
    "lora": {"name": "lora", **LORA},
    "qlora": {"name": "qlora", **LORA},
    "prompt": {"name": "prompt", "n_tokens": N_VIRTUAL_TOKENS},
    "last2": {"name": "last_n", "n_layers": LAST_N},
}


def gpt2lite_model(mode: str, preset: str, dropout: bool, weights_dir=None):
    """A gpt2lite model set up for `mode`, and a function (input_ids, labels) -> loss.

    weights_dir: a transformers checkpoint to start from (its config.json decides the model's dropout).
    """
    import gpt2lite
    from gpt2lite import peft

    method = dict(GPT2LITE_METHODS[mode])
    if weights_dir is not None and mode == "qlora":  # 4 bits as it reads: the float model is never held
        model = gpt2lite.GPT2.from_pretrained(str(weights_dir), quantize="nf4")
        method["name"] = "lora"
    elif weights_dir is not None:
        model = gpt2lite.GPT2.from_pretrained(str(weights_dir))
    else:
        model = gpt2lite.GPT2(gpt2lite.GPT2Config.from_name(preset, **dropout_overrides(dropout)))
    if "dropout" in method and not dropout:
        method["dropout"] = 0.0
    peft.apply(model, method)
    if mode == "prompt" and weights_dir is not None:
        with torch.no_grad():
            model.transformer.virtual_tokens.embedding.copy_(shared_prompt(model.config.n_embd))

    def loss_fn(input_ids, labels):
        return model(input_ids, labels=labels)

    return model, loss_fn


def reference_model(mode: str, preset: str, dropout: bool, weights_dir=None):
    """transformers' GPT2LMHeadModel set up for `mode` with peft, and a function (input_ids, labels) -> loss."""
    import transformers

    if mode == "qlora":
        if weights_dir is None:
            raise ValueError("the reference QLoRA quantizes a checkpoint as it loads it: pass weights_dir")
        import peft

        quantization = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32)
        model = transformers.GPT2LMHeadModel.from_pretrained(str(weights_dir), quantization_config=quantization,
                                                             device_map="cpu")
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        mode = "lora"  # LoRA on the 4-bit model, as below
    elif weights_dir is not None:
        model = transformers.GPT2LMHeadModel.from_pretrained(str(weights_dir))
    else:
        from gpt2lite import GPT2Config

        lite = GPT2Config.from_name(preset)
        config = transformers.GPT2Config(n_layer=lite.n_layer, n_head=lite.n_head, n_embd=lite.n_embd,
                                         n_positions=lite.n_positions, vocab_size=lite.vocab_size,
                                         **dropout_overrides(dropout))
        model = transformers.GPT2LMHeadModel(config)
    if mode in ("lora", "prompt"):
        import peft

        if mode == "lora":
            peft_config = peft.LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"],
                                          lora_dropout=LORA["dropout"] if dropout else 0.0,
                                          target_modules=list(LORA["targets"]), fan_in_fan_out=True,
                                          task_type="CAUSAL_LM")
        else:
            peft_config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N_VIRTUAL_TOKENS)
        model = peft.get_peft_model(model, peft_config)
        if mode == "prompt" and weights_dir is not None:
            with torch.no_grad():
                model.prompt_encoder["default"].embedding.weight.copy_(shared_prompt(model.config.n_embd))
    elif mode == "last2":
        n_layer = model.config.n_layer
        trainable = tuple(f"transformer.h.{i}." for i in range(n_layer - LAST_N, n_layer)) + ("transformer.ln_f.",)
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(name.startswith(trainable))

    def loss_fn(input_ids, labels):
        return model(input_ids=input_ids, labels=labels).loss

    return model, loss_fn


def shared_prompt(n_embd: int) -> torch.Tensor:
    """The soft prompt both stacks start from when they share weights: N(0, 1), as both initialise it."""
    return torch.randn(N_VIRTUAL_TOKENS, n_embd, generator=torch.Generator().manual_seed(1234))


def dropout_overrides(dropout: bool) -> dict:
    """GPT-2's default dropout (0.1 everywhere) when `dropout`, else none (for exact loss comparisons)."""
    return {} if dropout else dict(embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)


def enable_activation_checkpointing(stack: str, model):
    """Per-block activation checkpointing, non-reentrant on both sides."""
    if stack == "gpt2lite":
        model.set_activation_checkpointing(True)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def compiled(stack: str, model):
    """A loss function (input_ids, labels) -> loss through torch.compile(model), as each stack documents it:
    gpt2lite as TrainConfig(compile=True) does (dynamic=True: one graph for every batch length), the
    reference as the Trainer's torch_compile=True does (torch.compile(model), its defaults)."""
    if stack == "gpt2lite":
        fast = torch.compile(model, dynamic=True)
        return lambda input_ids, labels: fast(input_ids, labels=labels)
    fast = torch.compile(model)
    return lambda input_ids, labels: fast(input_ids=input_ids, labels=labels).loss


def build(stack: str, mode: str, preset: str, dropout: bool, weights_dir=None):
    """(model, loss_fn) of `stack` ("gpt2lite" or "reference") set up for `mode`."""
    if stack == "gpt2lite":
        return gpt2lite_model(mode, preset, dropout, weights_dir)
    if stack == "reference":
        return reference_model(mode, preset, dropout, weights_dir)
    raise ValueError(f"unknown stack {stack!r}")
