"""The hand-written model: presets, parameter counts on the meta device, padding masks, dropout, the loss."""

import pytest
import torch
import torch.nn.functional as F

from gpt2lite import GPT2, GPT2Config, GPT2ForSequenceClassification, count_parameters
from gpt2lite.kernels.loss import lm_loss as causal_lm_loss

transformers = pytest.importorskip("transformers")


def hf_config_for(config: GPT2Config):
    return transformers.GPT2Config(n_layer=config.n_layer, n_head=config.n_head, n_embd=config.n_embd,
                                   n_positions=config.n_positions, vocab_size=config.vocab_size)


def meta_hf_count(model_class, config: GPT2Config, **kwargs):
    """transformers' parameter count for the same config, built on the meta device (tied weights once)."""
    with torch.device("meta"):
        model = model_class(hf_config_for(config).__class__(**{**hf_config_for(config).to_dict(), **kwargs}))
    assert all(p.is_meta for p in model.parameters())  # building it allocated nothing
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name, expected", [("gpt2", 124_439_808), ("gpt2-medium", 354_823_168),
                                            ("gpt2-large", None), ("gpt2-xl", None), ("distilgpt2", None)])
def test_parameter_counts_on_meta_device(name, expected):
    config = GPT2Config.from_name(name)
    with torch.device("meta"):
        model = GPT2(config)
    assert all(p.is_meta for p in model.parameters())  # counting allocated nothing
    trainable, total = count_parameters(model)
    assert trainable == total
    assert total == meta_hf_count(transformers.GPT2LMHeadModel, config)
    if expected is not None:
        assert total == expected


def test_classifier_parameter_count_matches_transformers():
    config = GPT2Config.from_name("gpt2")
    with torch.device("meta"):
        model = GPT2ForSequenceClassification(config, num_labels=20)
    assert all(p.is_meta for p in model.parameters())
    expected = meta_hf_count(transformers.GPT2ForSequenceClassification, config, num_labels=20)
    assert count_parameters(model) == (expected, expected)


def test_count_parameters_counts_tied_weights_once_and_frozen_ones_as_untrainable():
    model = GPT2(GPT2Config.from_name("tiny"))
    assert model.lm_head.weight is model.transformer.wte.weight
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert count_parameters(model) == (total, total)
    model.transformer.wte.weight.requires_grad_(False)
    assert count_parameters(model) == (total - model.transformer.wte.weight.numel(), total)


def test_presets_and_replace():
    assert GPT2Config.from_name("openai-community/gpt2-medium") == GPT2Config.from_name("gpt2-medium")
    tiny = GPT2Config.from_name("tiny")
    assert (tiny.n_layer, tiny.n_embd, tiny.vocab_size) == (2, 64, 50257)
    assert tiny.replace(n_layer=3).n_layer == 3 and tiny.n_layer == 2


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return GPT2(GPT2Config.from_name("tiny")).eval()


def left_padded_batch(B=3, T=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50000, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for row in range(1, B):
        mask[row, : 3 * row] = 0
        ids[row, : 3 * row] = 50256
    return ids, mask


def test_no_nan_at_left_padded_positions_in_logits_or_gradients(tiny_model):
    """A padding query has no real key before it; gpt2lite lets it attend to itself so nothing is NaN."""
    ids, mask = left_padded_batch()
    logits = tiny_model(ids, attention_mask=mask)
    assert torch.isfinite(logits).all()  # every position, padded ones included
    labels = ids.masked_fill(mask == 0, -100)
    tiny_model.zero_grad()
    tiny_model(ids, attention_mask=mask, labels=labels).backward()
    assert all(torch.isfinite(p.grad).all() for p in tiny_model.parameters())
    tiny_model.zero_grad(set_to_none=True)


def test_padding_does_not_change_real_tokens(tiny_model):
    """A left-padded row with position ids counted from its first real token equals the unpadded row."""
    ids, mask = left_padded_batch()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        padded = tiny_model(ids, attention_mask=mask, position_ids=positions)
        for row in range(ids.size(0)):
            real = mask[row].bool()
            alone = tiny_model(ids[row, real][None])
            assert (padded[row, real] - alone[0]).abs().max() <= 1e-5


def test_last_only_and_inputs_embeds(tiny_model):
    ids, _ = left_padded_batch(B=2)
    with torch.no_grad():
        full = tiny_model(ids)
        assert (tiny_model(ids, last_only=True) - full[:, -1:]).abs().max() <= 1e-6
        embeds = tiny_model.transformer.wte(ids)
        assert (tiny_model(inputs_embeds=embeds) - full).abs().max() <= 1e-6


def test_dropout_active_in_train_mode_only():
    torch.manual_seed(0)
    model = GPT2(GPT2Config.from_name("tiny"))
    ids = torch.randint(0, 50000, (2, 8))
    model.train()
    assert not torch.equal(model(ids), model(ids))
    model.eval()
    assert torch.equal(model(ids), model(ids))


def test_labels_loss_all_ignored_is_zero_and_backward_works(tiny_model):
    ids, _ = left_padded_batch(B=2)
    loss = tiny_model(ids, labels=torch.full_like(ids, -100))
    assert loss.item() == 0.0
    loss.backward()  # no error: the zero still depends on the parameters
    tiny_model.zero_grad(set_to_none=True)


def test_chunked_label_loss_equals_full_cross_entropy(tiny_model):
    """causal_lm_loss in chunks of 3 positions equals one cross-entropy over the full logits."""
    ids, mask = left_padded_batch(B=3, T=12, seed=1)
    labels = ids.masked_fill(mask == 0, -100)
    hidden = tiny_model.transformer(ids, mask)
    chunked = causal_lm_loss(hidden, labels, tiny_model.lm_head, chunk_size=3)
    logits = tiny_model.lm_head(hidden)
    full = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    assert abs(chunked.item() - full.item()) <= 1e-5
    with pytest.raises(ValueError, match="labels have shape"):
        causal_lm_loss(hidden, labels[:, :-1], tiny_model.lm_head)


def test_classifier_reads_last_real_token_with_left_or_right_padding():
    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(GPT2Config.from_name("tiny"), num_labels=5).eval()
    ids = torch.randint(0, 50000, (1, 6))
    pad = torch.full((1, 3), 50256)
    with torch.no_grad():
        alone = model(ids)
        right = model(torch.cat([ids, pad], 1), attention_mask=torch.tensor([[1] * 6 + [0] * 3]))
        left = model(torch.cat([pad, ids], 1), attention_mask=torch.tensor([[0] * 3 + [1] * 6]),
                     position_ids=torch.tensor([[0, 0, 0, 0, 1, 2, 3, 4, 5]]))
    assert right.shape == (1, 5)
    assert (right - alone).abs().max() <= 1e-5 and (left - alone).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="num_labels"):
        GPT2ForSequenceClassification(GPT2Config.from_name("tiny"))
    with pytest.raises(ValueError, match="labels must be in"):
        model(ids, labels=torch.tensor([5]))
