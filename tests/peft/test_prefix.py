"""Prefix tuning against peft: parameter counts, logits with and without the MLP reparametrisation,
batched generation, peft's file format."""

import copy
import json

import pytest
import torch

from gpt2lite import GPT2, GPT2Config, count_parameters, generate
from gpt2lite.peft import load_adapter, save_adapter
from gpt2lite.peft.prefix import add_prefix, is_applied, prefix_of
from helpers import adamw_steps, hf_lm

N_TOKENS = 6
PROJECTION_DIM = 32


def peft_prefix_model(hf_model, prefix):
    """peft's prefix tuning on `hf_model`, with the weights of our `prefix` copied in."""
    import peft

    projection = prefix.transform is not None
    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=prefix.n_tokens,
                                     prefix_projection=projection,
                                     encoder_hidden_size=prefix.projection_dim or hf_model.config.n_embd)
    model = peft.get_peft_model(hf_model, config).eval()
    encoder = model.prompt_encoder.default
    with torch.no_grad():
        encoder.embedding.weight.copy_(prefix.embedding)
        if projection:
            encoder.transform.load_state_dict(prefix.transform.state_dict())
    return model


def left_padded_batch(seed=0, lengths=(4, 9, 6)):
    generator = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.full((len(lengths), T), 50256, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, T - n:] = torch.randint(0, 50257, (n,), generator=generator)
        mask[i, T - n:] = 1
    return ids, mask


@pytest.fixture(params=[False, True], ids=["table", "projection"])
def pair(request, tiny_hf_dir):
    torch.manual_seed(0)
    ours = GPT2.from_pretrained(str(tiny_hf_dir)).eval()
    add_prefix(ours, N_TOKENS, projection=request.param,
               projection_dim=PROJECTION_DIM if request.param else None)
    return ours, peft_prefix_model(hf_lm(tiny_hf_dir), prefix_of(ours))


@pytest.mark.parametrize("projection", [False, True])
def test_trainable_counts_on_gpt2_124m_equal_peft(projection):
    import peft
    import transformers

    with torch.device("meta"):
        ours = GPT2(GPT2Config.from_name("gpt2"))
        add_prefix(ours, 20, projection=projection, projection_dim=512 if projection else None)
        theirs = peft.get_peft_model(transformers.GPT2LMHeadModel(transformers.GPT2Config()), peft.PrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=20, prefix_projection=projection, encoder_hidden_size=512))
    expected = 20 * 768 + 768 * 512 + 512 + 512 * 18_432 + 18_432 if projection else 20 * 12 * 2 * 768
    assert count_parameters(ours)[0] == expected == theirs.get_nb_trainable_parameters()[0]


def test_logits_match_peft_with_left_padding(pair):
    ours, theirs = pair
    ids, mask = left_padded_batch()
    with torch.no_grad():
        plain = (ours(ids) - theirs(input_ids=ids).logits).abs().max()
        padded = ours(ids, attention_mask=mask) - theirs(input_ids=ids, attention_mask=mask).logits
    assert plain < 1e-5
    assert padded[mask.bool()].abs().max() < 1e-5


def test_labels_loss_matches_peft(pair):
    ours, theirs = pair
    ids, _ = left_padded_batch(seed=1, lengths=(10, 10))
    labels = ids.clone()
    labels[:, :3] = -100
    with torch.no_grad():
        assert abs(ours(ids, labels=labels).item() - theirs(input_ids=ids, labels=labels).loss.item()) < 1e-5


def test_left_padded_batch_generation_matches_peft(pair):
    ours, theirs = pair
    ids, mask = left_padded_batch(seed=2)
    ours_tokens = generate(ours, ids, 8, attention_mask=mask, eos_id=None)
    theirs_tokens = theirs.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                    pad_token_id=50256)[:, ids.size(1):]
    assert ours_tokens.tolist() == theirs_tokens.tolist()


def test_training_changes_only_the_prefix(tiny_hf_dir):
    torch.manual_seed(3)
    model = GPT2.from_pretrained(str(tiny_hf_dir))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    add_prefix(model, N_TOKENS, projection=True, projection_dim=PROJECTION_DIM)
    prefix_before = {k: v.clone() for k, v in prefix_of(model).state_dict().items()}
    adamw_steps(model, torch.randint(0, 50257, (2, 12)), steps=3, lr=1e-3)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not torch.equal(v, prefix_of(model).state_dict()[k]) for k, v in prefix_before.items())
    assert all(n.startswith("transformer.virtual_tokens.") for n, p in model.named_parameters() if p.requires_grad)


def test_saved_adapter_loads_in_peft_with_the_same_logits(pair, tiny_hf_dir, tmp_path):
    import peft

    ours, _ = pair
    save_adapter(ours, str(tmp_path))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "PREFIX_TUNING"
    theirs = peft.PeftModel.from_pretrained(hf_lm(tiny_hf_dir), str(tmp_path)).eval()
    ids, mask = left_padded_batch(seed=4)
    with torch.no_grad():
        diff = ours(ids, attention_mask=mask) - theirs(input_ids=ids, attention_mask=mask).logits
    assert diff[mask.bool()].abs().max() < 1e-5


def test_peft_saved_adapter_loads_in_gpt2lite(tiny_hf_dir, tmp_path):
    import peft

    torch.manual_seed(5)
    theirs = peft.get_peft_model(hf_lm(tiny_hf_dir), peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=16)).eval()
    theirs.save_pretrained(str(tmp_path))
    ours = GPT2.from_pretrained(str(tiny_hf_dir)).eval()
    load_adapter(ours, str(tmp_path))
    assert is_applied(ours) and ours.num_virtual_tokens == 4
    ids = torch.randint(0, 50257, (2, 7))
    with torch.no_grad():
        assert (ours(ids) - theirs(input_ids=ids).logits).abs().max() < 1e-5


def test_bad_input_gets_clear_errors(tiny_hf_dir, tmp_path):
    model = GPT2.from_pretrained(str(tiny_hf_dir))
    with pytest.raises(ValueError, match="n_tokens > 0"):
        add_prefix(copy.deepcopy(model), 0)
    with pytest.raises(ValueError, match="no room in the context"):
        add_prefix(copy.deepcopy(model), 500)
    with pytest.raises(ValueError, match="projection_dim"):
        add_prefix(copy.deepcopy(model), 4, projection_dim=16)
    with pytest.raises(ValueError, match="projection_dim must be a positive"):
        add_prefix(copy.deepcopy(model), 4, projection=True, projection_dim=0)
    add_prefix(model, 4)
    with pytest.raises(ValueError, match="already has a Prefix"):
        add_prefix(model, 4)
    with pytest.raises(ValueError, match="longer than the model's context"):
        model(torch.zeros(1, model.config.n_positions - 3, dtype=torch.long))
    save_adapter(model, str(tmp_path))
    other = GPT2(GPT2Config.from_name("tiny").replace(n_layer=3))
    with pytest.raises(ValueError, match="num_layers=2, this model has num_layers=3"):
        load_adapter(other, str(tmp_path))


def test_classifier_adapter_round_trips_through_peft(tiny_hf_classifier_dir, tmp_path):
    """A classifier's prefix is saved with its trained score head (peft's SEQ_CLS modules_to_save)."""
    import peft
    import transformers

    from gpt2lite import GPT2ForSequenceClassification

    torch.manual_seed(6)
    ours = GPT2ForSequenceClassification.from_pretrained(str(tiny_hf_classifier_dir)).eval()
    add_prefix(ours, N_TOKENS)
    with torch.no_grad():
        ours.score.modules_to_save.weight.normal_()  # the trainable copy, as in peft
    save_adapter(ours, str(tmp_path))
    theirs = peft.PeftModel.from_pretrained(
        transformers.GPT2ForSequenceClassification.from_pretrained(str(tiny_hf_classifier_dir)), str(tmp_path)).eval()
    reloaded = GPT2ForSequenceClassification.from_pretrained(str(tiny_hf_classifier_dir)).eval()
    load_adapter(reloaded, str(tmp_path))
    ids, mask = left_padded_batch(seed=7)
    with torch.no_grad():
        logits = ours(ids, attention_mask=mask)
        assert (logits - theirs(input_ids=ids, attention_mask=mask).logits).abs().max() < 1e-5
        assert torch.equal(logits, reloaded(ids, attention_mask=mask))
