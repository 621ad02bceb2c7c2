"""LoRA and DoRA by hand: exact at initialisation, merge/unmerge, disabled adapters, bias modes, QLoRA base,
errors. Parity with peft's logits lives in test_peft_io.py (same adapter weights through peft's format)."""

import pytest
import torch

from gpt2lite import GPT2, GPT2ForSequenceClassification
from gpt2lite.model.architectures import architecture
from gpt2lite.hub.weights import hf_to_gpt2lite, read_state_dict
from gpt2lite.kernels import FastLinear
from gpt2lite.peft import LoRALinear, ModulesToSave, add_lora, disable_adapters, merge_and_unload, merge_lora, unmerge_lora
from gpt2lite.quantization import quantize_nf4
from helpers import TOKENS, adamw_steps, load


def randomize_lora(model, seed=0, std=0.05):
    """Nonzero adapter weights, so that comparisons are meaningful (B is zero at initialisation)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, LoRALinear):
                for p in layer.adapter_parameters():
                    p.add_(torch.randn(p.shape, generator=generator) * std)


def train_steps(model, steps=2, lr=1e-2):
    """A few AdamW steps on a next-token loss over the trainable parameters."""
    model.train()
    adamw_steps(model, TOKENS, steps, lr, weight_decay=0.0)
    return model.eval()


@pytest.mark.parametrize("options", [{}, {"dora": True}, {"rslora": True, "dropout": 0.1}])
def test_lora_at_init_gives_the_base_logits_exactly(tiny_hf_dir, options):
    base = load(tiny_hf_dir)
    expected = base(TOKENS)
    model = add_lora(load(tiny_hf_dir), rank=4, alpha=8, targets=["c_attn", "c_proj", "c_fc"], **options)
    assert len([m for m in model.modules() if isinstance(m, LoRALinear)]) == 2 * 4
    assert torch.equal(model(TOKENS), expected)


@pytest.mark.parametrize("dora", [False, True])
def test_training_step_merge_unmerge_and_frozen_base(tiny_hf_dir, dora):
    model = add_lora(load(tiny_hf_dir), rank=4, alpha=8, targets=["c_attn", "attn.c_proj"], dora=dora)
    base_weights = {k: v.clone() for k, v in model.state_dict().items() if "lora" not in k}
    before = model(TOKENS)
    train_steps(model)
    for key, value in model.state_dict().items():  # training touched only the adapter
        if key in base_weights:
            assert torch.equal(value, base_weights[key]), key
    unmerged = model(TOKENS)
    assert (unmerged - before).abs().max() > 1e-3  # the adapter learned something
    merge_lora(model)
    merged_once = {k: v.clone() for k, v in model.state_dict().items()}
    merged = model(TOKENS)
    assert (merged - unmerged).abs().max() < 1e-5
    merge_lora(model)  # merging twice is merging once
    assert all(torch.equal(v, merged_once[k]) for k, v in model.state_dict().items())
    assert torch.equal(model(TOKENS), merged)
    unmerge_lora(model)
    unmerge_lora(model)
    for key, value in base_weights.items():
        assert (model.state_dict()[key] - value).abs().max() < 1e-6, key
    assert (model(TOKENS) - unmerged).abs().max() < 1e-5


def test_disable_adapters_runs_the_base_model_even_when_merged(tiny_hf_classifier_dir):
    base = load(tiny_hf_classifier_dir, GPT2ForSequenceClassification)
    expected = base(TOKENS)
    model = add_lora(load(tiny_hf_classifier_dir, GPT2ForSequenceClassification), rank=4, alpha=8,
                     targets=["c_attn"], modules_to_save=["score"])
    assert isinstance(model.score, ModulesToSave)
    randomize_lora(model)
    with torch.no_grad():
        model.score.modules_to_save.weight.add_(1.0)
    adapted = model(TOKENS)
    assert (adapted - expected).abs().max() > 1e-2
    for merged in (False, True):
        if merged:
            merge_lora(model)
        with disable_adapters(model):
            assert (model(TOKENS) - expected).abs().max() < 1e-5
        assert (model(TOKENS) - adapted).abs().max() < 1e-5
    assert all(layer.merged for layer in model.modules() if isinstance(layer, LoRALinear))


def hf_state(directory):
    return hf_to_gpt2lite(read_state_dict(str(directory)), architecture("gpt2"))


def test_base_checkpoint_loads_after_injection(tiny_hf_dir):
    torch.manual_seed(3)
    model = add_lora(GPT2(load(tiny_hf_dir).config).eval(), rank=4, alpha=8, targets=["c_attn", "c_fc"],
                     modules_to_save=["ln_f"])
    result = model.load_state_dict(hf_state(tiny_hf_dir), strict=False)
    assert result.unexpected_keys == []
    # only the adapter is missing from a base checkpoint (and lm_head, tied to wte, which it does not store)
    assert {k.split(".")[-2] for k in result.missing_keys} == {"lora_A", "lora_B", "lm_head"}, result.missing_keys
    assert torch.equal(model(TOKENS), load(tiny_hf_dir)(TOKENS))


BIAS_CASES = {
    "none": lambda name: False,
    "lora_only": lambda name: name.endswith("attn.c_attn.bias"),
    "all": lambda name: name.endswith(".bias"),  # every bias in GPT-2: linears and LayerNorms, as peft
}


@pytest.mark.parametrize("bias", sorted(BIAS_CASES))
def test_each_bias_mode_trains_what_it_should(tiny_hf_dir, bias):
    model = add_lora(load(tiny_hf_dir), rank=4, alpha=8, targets=["c_attn"], bias=bias)
    before = {k: v.clone() for k, v in model.named_parameters()}
    train_steps(model, steps=2)
    changed = {k for k, v in model.named_parameters() if not torch.equal(v, before[k])}
    lora = {k for k in before if ".lora_A." in k or ".lora_B." in k}
    biases = {k for k in before if BIAS_CASES[bias](k)}
    assert len(lora) == 4 and (bias == "none" or biases)
    assert changed == lora | biases
    assert {k for k, v in model.named_parameters() if v.requires_grad} == lora | biases


def test_layers_to_transform_adapts_only_those_blocks(tiny_hf_dir):
    model = add_lora(load(tiny_hf_dir), rank=4, alpha=8, targets=["c_attn", "c_proj"], layers_to_transform=[1])
    adapted = sorted(n for n, m in model.named_modules() if isinstance(m, LoRALinear))
    assert adapted == ["transformer.h.1.attn.c_attn", "transformer.h.1.attn.c_proj", "transformer.h.1.mlp.c_proj"]


def test_qlora_base_merge_is_refused_and_merge_and_unload_dequantizes(tiny_hf_dir):
    model = load(tiny_hf_dir)
    quantize_nf4(model, targets=["c_attn", "c_proj", "c_fc"])
    quantized = model(TOKENS)
    add_lora(model, rank=4, alpha=8, targets=["c_attn", "c_fc"], bias="lora_only")
    assert torch.equal(model(TOKENS), quantized)  # exact at init over the 4-bit base too
    packed = {k: v.clone() for k, v in model.state_dict().items() if "weight_packed" in k}
    train_steps(model, steps=3)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in packed.items())
    adapted = model(TOKENS)
    assert (adapted - quantized).abs().max() > 1e-3
    with pytest.raises(RuntimeError, match="merge_and_unload"):
        merge_lora(model)
    merge_and_unload(model)
    # dequantized, merged, kept in float, as a plain linear layer with the model's (fast) kernels
    assert type(model.transformer.h[0].attn.c_attn) is FastLinear
    assert (model(TOKENS) - adapted).abs().max() < 1e-5


def test_bad_input_is_refused_with_a_clear_message(tiny_hf_dir):
    model = load(tiny_hf_dir)
    with pytest.raises(ValueError, match="'q_proj' matches no module"):
        add_lora(model, rank=4, alpha=8, targets=["c_attn", "q_proj"])
    for rank in (0, -2, 2.5):
        with pytest.raises(ValueError, match="rank must be a positive integer"):
            add_lora(model, rank=rank, alpha=8, targets=["c_attn"])
    with pytest.raises(ValueError, match="bias must be one of"):
        add_lora(model, rank=4, alpha=8, targets=["c_attn"], bias="lora")
    with pytest.raises(ValueError, match="linear layers; the targets also match \\['transformer.h.0.ln_1"):
        add_lora(model, rank=4, alpha=8, targets=["c_attn", "ln_1"])
    with pytest.raises(ValueError, match="dropout must be in \\[0, 1\\)"):
        add_lora(model, rank=4, alpha=8, targets=["c_attn"], dropout=1.5)
    with pytest.raises(ValueError, match="out of range"):
        add_lora(model, rank=4, alpha=8, targets=["c_attn"], layers_to_transform=[5])
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # failed calls changed nothing
    add_lora(model, rank=4, alpha=8, targets=["attn.c_attn"])
    with pytest.raises(ValueError, match="already applied"):
        add_lora(model, rank=8, alpha=8, targets=["c_attn"])
