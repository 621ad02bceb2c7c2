"""Interchange with peft: the same adapter weights give the same logits in gpt2lite and in peft (each bias
mode, rsLoRA, DoRA, layers_to_transform, modules_to_save), through peft's file format in both directions;
a merged LoRA model saves as a plain Hugging Face GPT-2 checkpoint."""

import copy
import json

import pytest
import torch

from gpt2lite import GPT2, GPT2Config, GPT2ForSequenceClassification
from gpt2lite.hf import CheckpointError
from gpt2lite.peft import LoRALinear, add_lora, load_adapter, merge_and_unload, save_adapter
from gpt2lite.peft.lora import lora_trainable_parameters

TOKENS = torch.tensor([[464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13],
                       [40, 588, 257, 922, 1492, 546, 616, 3290, 290, 340]])

CASES = {  # our add_lora options -> the same LoraConfig options in peft
    "bias_none": ({}, {}),
    "bias_all": ({"bias": "all"}, {"bias": "all"}),
    "bias_lora_only": ({"bias": "lora_only"}, {"bias": "lora_only"}),
    "rslora": ({"rslora": True}, {"use_rslora": True}),
    "dora": ({"dora": True}, {"use_dora": True}),
    "dora_bias_all": ({"dora": True, "bias": "all"}, {"use_dora": True, "bias": "all"}),
    "layers_to_transform": ({"layers_to_transform": [1]}, {"layers_to_transform": [1]}),
    "classifier_modules_to_save": ({"modules_to_save": ["score"], "bias": "lora_only"},
                                   {"modules_to_save": ["score"], "bias": "lora_only"}),
}
TARGETS = ["c_attn", "c_proj"]


def is_classifier_case(case):
    return case.startswith("classifier")


@pytest.fixture(scope="module")
def bases(tiny_hf_dir, tiny_hf_classifier_dir):
    """Each base model loaded once per module; tests take deep copies."""
    import transformers

    return {
        ("ours", False): GPT2.from_pretrained(str(tiny_hf_dir)).eval(),
        ("ours", True): GPT2ForSequenceClassification.from_pretrained(str(tiny_hf_classifier_dir)).eval(),
        ("hf", False): transformers.GPT2LMHeadModel.from_pretrained(str(tiny_hf_dir)).eval(),
        ("hf", True): transformers.GPT2ForSequenceClassification.from_pretrained(str(tiny_hf_classifier_dir)).eval(),
    }


def ours_base(case, bases):
    return copy.deepcopy(bases["ours", is_classifier_case(case)])


def hf_base(case, bases):
    return copy.deepcopy(bases["hf", is_classifier_case(case)])


def perturb(parameters, seed):
    """Move every trainable tensor away from its initial value (B from zero, biases, the score copy)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in parameters:
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)


def hf_logits(model):
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


@pytest.mark.parametrize("case", sorted(CASES))
def test_ours_saved_in_peft_format_gives_the_same_logits_in_peft(case, bases, tmp_path):
    import peft

    ours_options, _ = CASES[case]
    model = add_lora(ours_base(case, bases), rank=4, alpha=8, targets=TARGETS,
                     **ours_options)
    perturb(lora_trainable_parameters(model, ours_options.get("bias", "none")), seed=1)
    expected = model(TOKENS)
    save_adapter(model, str(tmp_path))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "LORA"
    theirs = peft.PeftModel.from_pretrained(hf_base(case, bases), str(tmp_path)).eval()
    got = hf_logits(theirs)
    assert (got - expected).abs().max() < 1e-5
    base = hf_logits(hf_base(case, bases))
    assert (got - base).abs().max() > 1e-3  # the adapter matters, so agreeing is meaningful


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_saved_adapter_loads_into_gpt2lite_with_the_same_logits(case, bases, tmp_path):
    import peft

    _, peft_options = CASES[case]
    theirs = peft.get_peft_model(hf_base(case, bases),
                                 peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, **peft_options))
    perturb([p for p in theirs.parameters() if p.requires_grad], seed=2)
    theirs.eval()
    expected = hf_logits(theirs)
    theirs.save_pretrained(str(tmp_path))
    model = load_adapter(ours_base(case, bases), str(tmp_path))
    assert (model(TOKENS) - expected).abs().max() < 1e-5
    # and the loaded adapter trains what peft's did
    trainable_theirs = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert trainable_theirs > 0
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == trainable_theirs


@pytest.mark.parametrize("dora", [False, True])
def test_merged_lora_saves_as_a_plain_hf_checkpoint(bases, tmp_path, dora):
    import transformers

    model = add_lora(ours_base("lm", bases), rank=4, alpha=8, targets=["c_attn", "c_fc"],
                     bias="all", dora=dora)
    perturb(lora_trainable_parameters(model, "all"), seed=3)
    expected = model(TOKENS)
    with pytest.raises(CheckpointError, match="merge_and_unload"):  # LoRA tensors have no place in HF's format
        model.save_pretrained(str(tmp_path / "unmerged"))
    merge_and_unload(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    model.save_pretrained(str(tmp_path))
    loaded, info = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert (hf_logits(loaded.eval()) - expected).abs().max() < 1e-5
    assert (hf_logits(bases["hf", False]) - expected).abs().max() > 1e-3


def test_adapter_for_another_base_size_or_rank_is_refused(bases, tmp_path):
    model = add_lora(ours_base("lm", bases), rank=8, alpha=16, targets=["c_attn"])
    save_adapter(model, str(tmp_path))
    smaller = GPT2(GPT2Config.from_name("tiny", n_embd=32))
    with pytest.raises(ValueError, match="another base size"):
        load_adapter(smaller, str(tmp_path))
    other_rank = add_lora(ours_base("lm", bases), rank=4, alpha=8, targets=["c_attn"])
    with pytest.raises(ValueError, match="has rank 8, the model's LoRA layers have rank \\[4\\]"):
        load_adapter(other_rank, str(tmp_path))
    with pytest.raises(ValueError, match="no adapter to save"):
        save_adapter(ours_base("lm", bases), str(tmp_path / "none"))


@pytest.mark.parametrize("method", [{"name": "prompt", "n_tokens": 5}, {"name": "prefix", "n_tokens": 5},
                                    {"name": "ia3"}])
def test_save_and_load_adapter_dispatch_to_the_other_peft_methods(method, bases, tmp_path):
    """save_adapter/load_adapter hand prompt tuning, prefix tuning and IA3 to their own modules (whose own
    tests cover them in depth): the file is peft's, and both peft and gpt2lite reproduce the logits."""
    import peft

    from gpt2lite.peft import apply

    model = apply(ours_base("lm", bases), method)
    perturb([p for p in model.parameters() if p.requires_grad], seed=4)
    expected = model(TOKENS)
    save_adapter(model, str(tmp_path))
    peft_type = {"prompt": "PROMPT_TUNING", "prefix": "PREFIX_TUNING", "ia3": "IA3"}[method["name"]]
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == peft_type
    reloaded = load_adapter(ours_base("lm", bases), str(tmp_path))
    assert torch.equal(reloaded(TOKENS), expected)
    theirs = hf_logits(peft.PeftModel.from_pretrained(hf_base("lm", bases), str(tmp_path)).eval())
    # peft returns logits for the virtual tokens too (prompt tuning); the real tokens are the last T
    assert (theirs[:, -TOKENS.size(1):] - expected).abs().max() < 1e-5
    assert (expected - bases["ours", False](TOKENS)).abs().max() > 1e-3


@pytest.mark.parametrize("case", ["dora_bias_all", "rslora"])
def test_gradients_equal_peft(case, bases, tmp_path):
    """Same adapter, same loss: the same gradient for every adapter tensor (named as peft saves them)."""
    import peft

    from gpt2lite.peft.adapter_io import lora_state_dict

    ours_options, _ = CASES[case]
    model = add_lora(ours_base(case, bases), rank=4, alpha=8, targets=TARGETS, **ours_options)
    perturb(lora_trainable_parameters(model, ours_options.get("bias", "none")), seed=5)
    save_adapter(model, str(tmp_path))
    theirs = peft.PeftModel.from_pretrained(hf_base(case, bases), str(tmp_path), is_trainable=True).eval()
    model(TOKENS, labels=TOKENS).backward()
    theirs(input_ids=TOKENS, labels=TOKENS).loss.backward()
    their_grads = {name.replace(".default", "").replace("lora_magnitude_vector.weight", "lora_magnitude_vector"): p.grad
                   for name, p in theirs.named_parameters() if p.requires_grad}  # peft's names -> its saved keys
    ours_grads = {key: p.grad for key, p in lora_state_dict(model).items()}
    assert set(ours_grads) == set(their_grads) and len(ours_grads) > 8
    for key, grad in ours_grads.items():
        torch.testing.assert_close(grad, their_grads[key], atol=1e-6, rtol=1e-4, msg=key)
