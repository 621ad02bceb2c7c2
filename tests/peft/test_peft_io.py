"""Interchange with peft: the same adapter weights give the same logits in gpt2lite and in peft (each bias
mode, rsLoRA, DoRA, layers_to_transform, modules_to_save), through peft's file format in both directions;
a merged LoRA model saves as a plain Hugging Face GPT-2 checkpoint."""

import copy
import json

import pytest
import torch

from gpt2lite import GPT2, GPT2Config, GPT2ForSequenceClassification, count_parameters
from gpt2lite.errors import CheckpointError
from gpt2lite.peft import LoRALinear, ModulesToSave, add_lora, load_adapter, merge_and_unload, save_adapter
from gpt2lite.peft.lora.add import lora_trainable_parameters
from helpers import TOKENS


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

    from gpt2lite.peft.peft_format import LoRAFormat, peft_tensors

    ours_options, _ = CASES[case]
    model = add_lora(ours_base(case, bases), rank=4, alpha=8, targets=TARGETS, **ours_options)
    perturb(lora_trainable_parameters(model, ours_options.get("bias", "none")), seed=5)
    save_adapter(model, str(tmp_path))
    theirs = peft.PeftModel.from_pretrained(hf_base(case, bases), str(tmp_path), is_trainable=True).eval()
    model(TOKENS, labels=TOKENS).backward()
    theirs(input_ids=TOKENS, labels=TOKENS).loss.backward()
    their_grads = {name.replace(".default", "").replace("lora_magnitude_vector.weight", "lora_magnitude_vector"): p.grad
                   for name, p in theirs.named_parameters() if p.requires_grad}  # peft's names -> its saved keys
    ours_grads = {key: p.grad for key, p in peft_tensors(model, LoRAFormat()).items()}
    assert set(ours_grads) == set(their_grads) and len(ours_grads) > 8
    for key, grad in ours_grads.items():
        torch.testing.assert_close(grad, their_grads[key], atol=1e-6, rtol=1e-4, msg=key)


def test_peft_seq_cls_lora_adapter_loads_with_the_same_logits(bases, tmp_path):
    """peft's standard classifier adapter (task_type="SEQ_CLS" writes modules_to_save ["classifier", "score"]):
    "classifier" names no module of GPT-2 and is ignored, as peft ignores it; the score copy loads."""
    import peft

    theirs = peft.get_peft_model(hf_base("classifier", bases), peft.LoraConfig(
        task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["c_attn"]))
    perturb([p for p in theirs.parameters() if p.requires_grad], seed=6)
    theirs.eval()
    theirs.save_pretrained(str(tmp_path))
    assert set(json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"]) == {"classifier", "score"}
    model = load_adapter(ours_base("classifier", bases), str(tmp_path))
    assert (model(TOKENS) - hf_logits(theirs)).abs().max() < 2e-6
    assert (model(TOKENS) - bases["ours", True](TOKENS)).abs().max() > 1e-3
    assert count_parameters(model) == theirs.get_nb_trainable_parameters()
    # and saved back, peft reads it again (the unmatched name is kept, as peft keeps it)
    save_adapter(model, str(tmp_path / "again"))
    again = peft.PeftModel.from_pretrained(hf_base("classifier", bases), str(tmp_path / "again")).eval()
    assert (hf_logits(again) - hf_logits(theirs)).abs().max() < 2e-6


def test_modules_to_save_names_that_match_nothing_are_ignored_but_targets_are_not(bases):
    model = add_lora(ours_base("classifier", bases), rank=4, alpha=8, targets=["c_attn"],
                     modules_to_save=["classifier", "score"])
    assert [n for n, p in model.named_parameters() if p.requires_grad and "lora" not in n] == [
        "score.modules_to_save.weight"]
    with pytest.raises(ValueError, match="target 'classifier' matches no module"):
        add_lora(ours_base("classifier", bases), rank=4, alpha=8, targets=["c_attn", "classifier"])


METHODS = {  # a method as apply() names it -> how its modules are told apart from the base's
    "lora": {"name": "lora", "rank": 4, "alpha": 8, "dropout": 0.5, "targets": ["c_attn"]},
    "prompt": {"name": "prompt", "n_tokens": 4},
    "prefix": {"name": "prefix", "n_tokens": 4, "projection": True},
    "ia3": {"name": "ia3"},
}


@pytest.mark.parametrize("head", ["lm", "classifier"])
@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_new_adapter_modules_take_the_models_mode(method, head, mode, bases, tmp_path):
    """add_lora, prompts, prefixes, IA3, modules_to_save (the classifier's score copy) and load_adapter: every
    module added to a model in eval mode is in eval mode (LoRA dropout off), and in train mode likewise."""
    from gpt2lite.peft import apply

    classifier = head == "classifier"
    base = ours_base(head, bases).train(mode == "train")
    model = apply(copy.deepcopy(base), METHODS[method])
    assert {m.training for m in model.modules()} == {mode == "train"}
    save_adapter(model, str(tmp_path))
    loaded = load_adapter(copy.deepcopy(base), str(tmp_path))
    assert {m.training for m in loaded.modules()} == {mode == "train"}
    assert isinstance(loaded.score, ModulesToSave) if classifier else True


def test_loaded_lora_dropout_is_off_in_an_eval_model(bases, tmp_path):
    """The issue's case: a peft adapter with lora_dropout loaded into a model in eval mode gives the same
    logits on every call, peft's logits."""
    import peft

    theirs = peft.get_peft_model(hf_base("lm", bases), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5,
                                                                      target_modules=["c_attn", "c_fc"]))
    perturb([p for p in theirs.parameters() if p.requires_grad], seed=7)
    theirs.save_pretrained(str(tmp_path))
    model = load_adapter(ours_base("lm", bases), str(tmp_path))  # an eval-mode base
    first, second = model(TOKENS), model(TOKENS)
    assert torch.equal(first, second)
    assert (first - hf_logits(theirs.eval())).abs().max() < 1e-5


@pytest.mark.parametrize("method", ["prompt", "prefix", "ia3"])
def test_classifier_adapters_of_the_other_methods_round_trip_through_peft(method, bases, tmp_path):
    """Prompt-, prefix- and IA3-adapted classifiers save in peft's SEQ_CLS format through save_adapter:
    peft.PeftModel.from_pretrained on the transformers classifier gives the same logits, and load_adapter
    gives them back, trained score head included."""
    import peft

    from gpt2lite.peft import apply

    model = apply(ours_base("classifier", bases), {"name": method, **({"n_tokens": 5} if method != "ia3" else {})})
    perturb([p for p in model.parameters() if p.requires_grad], seed=8)
    expected = model(TOKENS)
    save_adapter(model, str(tmp_path))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["classifier", "score"]
    theirs = peft.PeftModel.from_pretrained(hf_base("classifier", bases), str(tmp_path)).eval()
    assert (hf_logits(theirs) - expected).abs().max() < 1e-5
    # peft loads prompt learning frozen; the total holds the same tensors (the frozen original score too)
    assert count_parameters(model)[1] == theirs.get_nb_trainable_parameters()[1]
    reloaded = load_adapter(ours_base("classifier", bases), str(tmp_path))
    assert torch.equal(reloaded(TOKENS), expected)
    assert (expected - bases["ours", True](TOKENS)).abs().max() > 1e-3


def test_peft_adapter_saved_as_a_pickle_bin_loads_safely(bases, tmp_path):
    """peft's older adapter_model.bin (safe_serialization=False) loads, read with weights_only=True."""
    import peft

    theirs = peft.get_peft_model(hf_base("lm", bases), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"]))
    perturb([p for p in theirs.parameters() if p.requires_grad], seed=9)
    theirs.eval().save_pretrained(str(tmp_path), safe_serialization=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.bin"]
    model = load_adapter(ours_base("lm", bases), str(tmp_path))
    assert (model(TOKENS) - hf_logits(theirs)).abs().max() < 1e-5
