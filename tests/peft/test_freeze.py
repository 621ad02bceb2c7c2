"""Full fine-tuning, the frozen baseline, last-N-block tuning (with the tied/untied head choice), BitFit, and
apply() switching between methods by name: after a training step exactly the chosen parameters changed."""

import copy

import pytest
import torch

from gpt2lite import GPT2ForSequenceClassification, count_parameters
from gpt2lite.peft import LoRALinear, MethodConfig, ModulesToSave, add_bitfit, apply, disable_adapters, freeze_layers
from helpers import TOKENS, adamw_steps, load

def changed_by_a_step(model, labels=None):
    """Names of the parameters two AdamW steps change (two: LoRA's A gets a gradient once B is nonzero).
    Tied parameters appear under their first name."""
    before = {k: v.clone() for k, v in model.named_parameters()}
    model.train()
    adamw_steps(model, TOKENS, steps=2, lr=1e-2, weight_decay=0.0, labels=labels)
    model.eval()
    return {k for k, v in model.named_parameters() if not torch.equal(v, before[k])}


def test_full_finetuning_trains_everything(tiny_hf_dir):
    model = apply(load(tiny_hf_dir), "full")
    assert changed_by_a_step(model) == {k for k, _ in model.named_parameters()}


def test_frozen_baseline_trains_nothing_except_a_classifier_head(tiny_hf_dir, tiny_hf_classifier_dir):
    model = apply(load(tiny_hf_dir), {"name": "frozen"})
    assert count_parameters(model)[0] == 0
    classifier = apply(load(tiny_hf_classifier_dir, GPT2ForSequenceClassification), "frozen")
    assert changed_by_a_step(classifier, labels=torch.tensor([3, 7])) == {"score.weight"}


@pytest.mark.parametrize("head", ["none", "tied", "untied"])
def test_last_n_trains_the_last_blocks_ln_f_and_the_chosen_head(tiny_hf_dir, head):
    model = load(tiny_hf_dir)
    wte_before = model.transformer.wte.weight.clone()
    apply(model, MethodConfig(name="last_n", n_layers=1, head=head))
    expected = {k for k, _ in model.named_parameters() if k.startswith(("transformer.h.1.", "transformer.ln_f."))}
    if head == "tied":
        expected.add("transformer.wte.weight")  # lm_head *is* wte: training the head trains the embeddings
    if head == "untied":
        expected.add("lm_head.weight")
        assert model.lm_head.weight is not model.transformer.wte.weight
        assert torch.equal(model.lm_head.weight, wte_before)  # initialised from wte
        assert model.config.tie_word_embeddings is False  # so save_pretrained writes both matrices
    assert changed_by_a_step(model) == expected
    assert torch.equal(model.transformer.wte.weight, wte_before) == (head != "tied")
    block = sum(p.numel() for p in model.transformer.h[1].parameters())
    head_size = 0 if head == "none" else model.lm_head.weight.numel()
    assert count_parameters(model)[0] == block + 2 * model.config.n_embd + head_size


def test_last_n_refuses_bad_choices(tiny_hf_dir, tiny_hf_classifier_dir):
    with pytest.raises(ValueError, match="last_n must be an integer in \\[0, 2\\]"):
        freeze_layers(load(tiny_hf_dir), last_n=3)
    with pytest.raises(ValueError, match="head='score' is not one of"):
        freeze_layers(load(tiny_hf_dir), last_n=1, head="score")
    classifier = freeze_layers(load(tiny_hf_classifier_dir, GPT2ForSequenceClassification), last_n=0)
    assert [k for k, p in classifier.named_parameters() if p.requires_grad] == ["score.weight"]


def test_bitfit_trains_biases_only(tiny_hf_dir):
    model = add_bitfit(load(tiny_hf_dir))
    changed = changed_by_a_step(model)
    assert changed == {k for k, _ in model.named_parameters() if k.endswith(".bias")}
    assert len(changed) == 2 * 6 + 1  # per block: ln_1, c_attn, attn.c_proj, ln_2, c_fc, mlp.c_proj; and ln_f


def test_apply_lora_and_qlora_on_a_classifier_keep_the_score_head_trainable(tiny_hf_classifier_dir):
    for name in ("lora", "qlora"):
        model = apply(load(tiny_hf_classifier_dir, GPT2ForSequenceClassification),
                      {"name": name, "rank": 4, "alpha": 8, "targets": ["c_attn"], "bias": "lora_only"})
        assert isinstance(model.score, ModulesToSave)
        changed = changed_by_a_step(model, labels=torch.tensor([3, 7]))
        quantized = any(type(m).__name__ == "NF4Linear" for m in model.modules())
        assert quantized == (name == "qlora")
        bias = "base_layer.bias" if quantized else "bias"  # a 4-bit base layer keeps its own (float) bias
        assert changed == {"score.modules_to_save.weight"} | {
            f"transformer.h.{i}.attn.c_attn.{p}" for i in (0, 1) for p in ("lora_A.weight", "lora_B.weight", bias)}


def test_apply_accepts_configs_dicts_and_names_and_refuses_unknown_ones(tiny_hf_dir):
    model = apply(load(tiny_hf_dir), MethodConfig(name="lora", rank=2, targets=("attn.c_proj",), dora=True))
    assert sorted(n for n, m in model.named_modules() if isinstance(m, LoRALinear)) == [
        "transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"]
    with pytest.raises(ValueError, match="unknown method 'adapterdrop'"):
        apply(load(tiny_hf_dir), "adapterdrop")
    with pytest.raises(ValueError, match="unknown method option\\(s\\) \\['r'\\]"):
        apply(load(tiny_hf_dir), {"name": "lora", "r": 8})
    with pytest.raises(ValueError, match="method 'prompt' does not read rank=4 \\(an option of lora and qlora\\)"):
        apply(load(tiny_hf_dir), {"name": "prompt", "rank": 4})


def test_method_config_refuses_options_of_another_method():
    takes = "'prompt' takes \\['n_tokens', 'init_text'\\]"
    with pytest.raises(ValueError, match="method 'prompt' does not read rank=8 .*" + takes):
        MethodConfig.from_value({"name": "prompt", "rank": 8})  # named, though at its default value
    with pytest.raises(ValueError, match="'lora' does not read n_tokens=5 \\(an option of prompt and prefix\\)"):
        MethodConfig(name="lora", n_tokens=5)
    with pytest.raises(ValueError, match="method 'qlora' does not read projection=True"):
        MethodConfig(name="qlora", projection=True)
    with pytest.raises(ValueError, match="method 'ia3' does not read targets=\\['c_attn'\\].*takes no options"):
        MethodConfig.from_value({"name": "ia3", "targets": ["c_attn"]})
    assert MethodConfig(name="qlora", rank=4, compute_dtype="bfloat16").rank == 4  # its own options pass


ADAPTERS = {  # every method with an adapter to switch off, as apply() names it
    "lora": {"name": "lora", "rank": 4, "alpha": 8, "targets": ["c_attn"]},
    "prompt": {"name": "prompt", "n_tokens": 5},
    "prefix": {"name": "prefix", "n_tokens": 5},
    "ia3": {"name": "ia3"},
}


@pytest.mark.parametrize("head", ["lm", "classifier"])
@pytest.mark.parametrize("method", sorted(ADAPTERS))
def test_disable_adapters_runs_the_base_model(tiny_hf_dir, tiny_hf_classifier_dir, method, head):
    """Inside disable_adapters every method's adapter (and a classifier's trained score copy) is off: the
    base model's logits exactly; afterwards the adapter is back."""
    base = load(tiny_hf_dir) if head == "lm" else load(tiny_hf_classifier_dir, GPT2ForSequenceClassification)
    model = apply(copy.deepcopy(base), ADAPTERS[method])
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # trained-looking: LoRA's B and IA3's vectors start where they change nothing
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=generator))
    ids = torch.randint(0, 50000, (2, 6), generator=generator)
    with torch.no_grad():
        with disable_adapters(model):
            assert torch.equal(model(ids), base(ids))
        assert not torch.allclose(model(ids), base(ids))
