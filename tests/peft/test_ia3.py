"""IA3 against peft: peft's GPT-2 defaults, parameter counts, logits, peft's file format."""

import copy

import pytest
import torch

from gpt2lite import GPT2, GPT2Config, count_parameters
from gpt2lite.model.architectures import default_targets
from gpt2lite.peft import load_adapter, save_adapter
from gpt2lite.peft.ia3 import add_ia3, ia3_layers, is_applied
from helpers import adamw_steps, hf_lm


def randomise_vectors(model, seed=0):
    """Trained-looking IA3 vectors (they start at ones)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in ia3_layers(model).values():
            layer.ia3_l.copy_(torch.rand(layer.ia3_l.shape, generator=generator) + 0.5)


def copy_vectors_to_peft(ours, theirs):
    with torch.no_grad():
        for name, layer in ia3_layers(ours).items():
            target = theirs.get_submodule("base_model.model." + name).ia3_l["default"]
            target.copy_(layer.ia3_l.view_as(target))


def test_defaults_are_peft_defaults_for_gpt2():
    from peft.utils.constants import (TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING,
                                      TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING)

    with torch.device("meta"):
        model = GPT2(GPT2Config.from_name("tiny"))
    assert sorted(default_targets(model, "ia3")) == sorted(TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING["gpt2"])
    assert (sorted(default_targets(model, "ia3_feedforward"))
            == sorted(TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING["gpt2"]))


def test_trainable_count_on_gpt2_124m_equals_peft():
    import peft
    import transformers

    with torch.device("meta"):
        ours = GPT2(GPT2Config.from_name("gpt2"))
        add_ia3(ours)
        theirs = peft.get_peft_model(transformers.GPT2LMHeadModel(transformers.GPT2Config()),
                                     peft.IA3Config(task_type="CAUSAL_LM"))
    # per block: c_attn's 2304 outputs + mlp.c_proj's 3072 inputs
    assert count_parameters(ours) == theirs.get_nb_trainable_parameters() == (12 * (2304 + 3072),
                                                                               124_439_808 + 12 * (2304 + 3072))


def test_identity_at_initialisation_and_logits_match_peft(tiny_hf_dir):
    import peft

    base = GPT2.from_pretrained(str(tiny_hf_dir)).eval()
    ours = copy.deepcopy(base)
    add_ia3(ours)
    ids = torch.randint(0, 50257, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(ours(ids), base(ids))
    randomise_vectors(ours)
    theirs = peft.get_peft_model(hf_lm(tiny_hf_dir), peft.IA3Config(task_type="CAUSAL_LM")).eval()
    copy_vectors_to_peft(ours, theirs)
    with torch.no_grad():
        ours_logits, theirs_logits = ours(ids), theirs(input_ids=ids).logits
        assert (ours_logits - base(ids)).abs().max() > 1e-2  # the vectors do change the model
    assert (ours_logits - theirs_logits).abs().max() < 1e-5


def test_custom_targets_match_peft(tiny_hf_dir):
    import peft

    ours = GPT2.from_pretrained(str(tiny_hf_dir)).eval()
    add_ia3(ours, targets=["c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"], feedforward=["mlp.c_proj"])
    assert len(ia3_layers(ours)) == 8
    randomise_vectors(ours, seed=2)
    theirs = peft.get_peft_model(hf_lm(tiny_hf_dir), peft.IA3Config(
        task_type="CAUSAL_LM", target_modules=["c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
        feedforward_modules=["mlp.c_proj"])).eval()
    copy_vectors_to_peft(ours, theirs)
    ids = torch.randint(0, 50257, (2, 9))
    with torch.no_grad():
        assert (ours(ids) - theirs(input_ids=ids).logits).abs().max() < 1e-5


def test_training_changes_only_the_vectors(tiny_hf_dir):
    model = GPT2.from_pretrained(str(tiny_hf_dir))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    add_ia3(model)
    adamw_steps(model, torch.randint(0, 50257, (2, 12)), steps=2, lr=1e-2)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and biases keep their keys and values
    assert all(not torch.equal(layer.ia3_l, torch.ones_like(layer.ia3_l)) for layer in ia3_layers(model).values())


def test_peft_format_round_trips_both_ways(tiny_hf_dir, tmp_path):
    import peft

    ours = GPT2.from_pretrained(str(tiny_hf_dir)).eval()
    add_ia3(ours)
    randomise_vectors(ours, seed=3)
    save_adapter(ours, str(tmp_path / "ours"))
    theirs = peft.PeftModel.from_pretrained(hf_lm(tiny_hf_dir), str(tmp_path / "ours")).eval()
    ids = torch.randint(0, 50257, (2, 9))
    with torch.no_grad():
        assert (ours(ids) - theirs(input_ids=ids).logits).abs().max() < 1e-5

    theirs = peft.get_peft_model(hf_lm(tiny_hf_dir), peft.IA3Config(task_type="CAUSAL_LM", init_ia3_weights=False))
    theirs.save_pretrained(str(tmp_path / "theirs"))  # random vectors
    loaded = GPT2.from_pretrained(str(tiny_hf_dir)).eval()
    load_adapter(loaded, str(tmp_path / "theirs"))
    assert is_applied(loaded)
    with torch.no_grad():
        assert (loaded(ids) - theirs.eval()(input_ids=ids).logits).abs().max() < 1e-5


def test_bad_input_gets_clear_errors(tiny_hf_dir, tmp_path):
    model = GPT2.from_pretrained(str(tiny_hf_dir))
    with pytest.raises(ValueError, match="matches no module"):
        add_ia3(copy.deepcopy(model), targets=["q_proj"])
    with pytest.raises(ValueError, match="subset of the targets"):
        add_ia3(copy.deepcopy(model), targets=["c_attn"], feedforward=["mlp.c_fc"])
    add_ia3(model)
    with pytest.raises(ValueError, match="already applied"):
        add_ia3(model)
    save_adapter(model, str(tmp_path))
    wider = GPT2(GPT2Config.from_name("tiny").replace(n_embd=128))
    with pytest.raises(ValueError, match="another model size"):
        load_adapter(wider, str(tmp_path))


def test_classifier_adapter_round_trips_through_peft(tiny_hf_classifier_dir, tmp_path):
    """IA3 on a classifier is saved with its trained score head (peft's SEQ_CLS modules_to_save)."""
    import peft
    import transformers

    from gpt2lite import GPT2ForSequenceClassification

    ours = GPT2ForSequenceClassification.from_pretrained(str(tiny_hf_classifier_dir)).eval()
    add_ia3(ours)
    randomise_vectors(ours, seed=4)
    with torch.no_grad():
        ours.score.modules_to_save.weight.normal_()  # the trainable copy, as in peft
    save_adapter(ours, str(tmp_path))
    theirs = peft.PeftModel.from_pretrained(
        transformers.GPT2ForSequenceClassification.from_pretrained(str(tiny_hf_classifier_dir)), str(tmp_path)).eval()
    reloaded = GPT2ForSequenceClassification.from_pretrained(str(tiny_hf_classifier_dir)).eval()
    load_adapter(reloaded, str(tmp_path))
    ids = torch.randint(0, 50000, (3, 8))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        logits = ours(ids, attention_mask=mask)
        assert (logits - theirs(input_ids=ids, attention_mask=mask).logits).abs().max() < 1e-5
        assert torch.equal(logits, reloaded(ids, attention_mask=mask))
