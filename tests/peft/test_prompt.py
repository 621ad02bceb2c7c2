"""Soft-prompt tuning against peft: parameter counts, logits, loss, generation, peft's file format."""

import copy
import json

import pytest
import torch

from gpt2lite import GPT2, GPT2Config, Tokenizer, count_parameters, generate
from gpt2lite.peft import load_adapter, save_adapter
from gpt2lite.peft.prompt import add_soft_prompt, is_applied, soft_prompt
from helpers import adamw_steps, hf_lm

N_TOKENS = 5


def peft_prompt_model(hf_model, embedding):
    """peft's prompt tuning on `hf_model`, with our prompt embeddings copied in."""
    import peft

    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=embedding.size(0))
    model = peft.get_peft_model(hf_model, config).eval()
    with torch.no_grad():
        model.prompt_encoder.default.embedding.weight.copy_(embedding)
    return model


def left_padded(rows, pad_id=50256):
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, T - len(row):] = row
        mask[i, T - len(row):] = 1
    return ids, mask


@pytest.fixture
def pair(tiny_hf_dir):
    """(ours with a random soft prompt, peft with the same prompt weights)."""
    torch.manual_seed(0)
    ours = GPT2.from_pretrained(str(tiny_hf_dir)).eval()
    add_soft_prompt(ours, N_TOKENS)
    return ours, peft_prompt_model(hf_lm(tiny_hf_dir), soft_prompt(ours).embedding)


def test_prompt_tuning_20_tokens_on_gpt2_124m_counts_15360_like_peft():
    import peft
    import transformers

    with torch.device("meta"):
        ours = GPT2(GPT2Config.from_name("gpt2"))
        add_soft_prompt(ours, 20)
        theirs = peft.get_peft_model(transformers.GPT2LMHeadModel(transformers.GPT2Config()),
                                     peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20))
    trainable, total = count_parameters(ours)
    peft_trainable, peft_total = theirs.get_nb_trainable_parameters()
    assert trainable == 15_360 == peft_trainable
    assert total == 124_439_808 + 15_360 == peft_total


def test_logits_match_peft_without_and_with_right_padding(pair):
    ours, theirs = pair
    torch.manual_seed(1)
    ids = torch.randint(0, 50257, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding: peft's positions for the real tokens are ours too
    with torch.no_grad():
        plain = (ours(ids) - theirs(input_ids=ids).logits[:, N_TOKENS:]).abs().max()
        ours_padded = ours(ids, attention_mask=mask)
        theirs_padded = theirs(input_ids=ids, attention_mask=mask).logits[:, N_TOKENS:]
    real = mask.bool()
    assert plain < 1e-5
    assert (ours_padded - theirs_padded)[real].abs().max() < 1e-5


def test_labels_loss_matches_peft(pair):
    """Every token labelled (language modelling): as in peft, the prompt's last virtual token predicts the
    first real token, so labels[:, 0] counts too; the loss and the prompt's gradient equal peft's."""
    ours, theirs = pair
    torch.manual_seed(2)
    ids = torch.randint(0, 50257, (2, 10))
    labels = ids.clone()
    ours_loss = ours(ids, labels=labels)
    theirs_loss = theirs(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
    assert abs(ours_loss.item() - theirs_loss.item()) < 1e-5
    ours_loss.backward()
    theirs_loss.backward()
    torch.testing.assert_close(soft_prompt(ours).embedding.grad, theirs.prompt_encoder.default.embedding.weight.grad,
                               atol=1e-6, rtol=1e-4)
    with torch.no_grad():  # the same through inputs_embeds, and with right padding (pads labelled -100)
        embedded = ours(inputs_embeds=ours.transformer.wte(ids), labels=labels)
        mask = torch.ones_like(ids)
        mask[1, 7:] = 0
        padded_labels = labels.masked_fill(mask == 0, -100)
        ours_padded = ours(ids, attention_mask=mask, labels=padded_labels)
        theirs_padded = theirs(input_ids=ids, attention_mask=mask, labels=padded_labels).loss
    assert torch.equal(embedded, ours_loss.detach())
    assert abs(ours_padded.item() - theirs_padded.item()) < 1e-5


def test_the_prompts_last_position_predicts_the_first_token(pair):
    """The first label is predicted at the prompt's last position: masking every label but the first still
    gives a loss (log-likelihood of token 0 after the prompt), equal to peft's; logits stay aligned with ids."""
    ours, theirs = pair
    torch.manual_seed(9)
    ids = torch.randint(0, 50257, (2, 6))
    labels = torch.full_like(ids, -100)
    labels[:, 0] = ids[:, 0]
    with torch.no_grad():
        ours_loss = ours(ids, labels=labels)
        theirs_out = theirs(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
        last_virtual = theirs_out.logits[:, N_TOKENS - 1]  # (B, V): predicts ids[:, 0]
        by_hand = torch.nn.functional.cross_entropy(last_virtual, ids[:, 0])
        assert ours(ids).shape == (2, 6, 50257)
    assert abs(ours_loss.item() - theirs_out.loss.item()) < 1e-5
    assert abs(ours_loss.item() - by_hand.item()) < 1e-5


def test_initialisations(tiny_hf_dir):
    base = GPT2.from_pretrained(str(tiny_hf_dir))
    wte = base.transformer.wte.weight.detach()

    random_model = copy.deepcopy(base)
    add_soft_prompt(random_model, 100, generator=torch.Generator().manual_seed(0))
    random_rows = soft_prompt(random_model).embedding.detach()
    assert abs(random_rows.std().item() - 1.0) < 0.05  # peft's RANDOM: nn.Embedding's N(0, 1)

    vocab_model = copy.deepcopy(base)
    add_soft_prompt(vocab_model, 10, init="vocab")
    vocab_rows = soft_prompt(vocab_model).embedding.detach()
    assert all(bool((wte == row).all(-1).any()) for row in vocab_rows)  # each row is a vocabulary embedding

    text = "Summarize the following article:"
    tokenizer = Tokenizer()
    text_model = copy.deepcopy(base)
    add_soft_prompt(text_model, 20, init_text=text, tokenizer=tokenizer)
    text_rows = soft_prompt(text_model).embedding.detach()
    token_ids = [int((wte == row).all(-1).nonzero()[0]) for row in text_rows]
    n_text = len(tokenizer.encode(text))
    assert tokenizer.decode(token_ids[:n_text]) == text
    assert token_ids[n_text:] == (token_ids * 3)[:20 - n_text]  # repeated to fill 20 tokens, as peft


def test_training_changes_only_the_prompt_embedding(tiny_hf_dir):
    torch.manual_seed(3)
    model = GPT2.from_pretrained(str(tiny_hf_dir))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    add_soft_prompt(model, N_TOKENS, init="vocab")
    prompt_before = soft_prompt(model).embedding.detach().clone()
    losses = adamw_steps(model, torch.randint(0, 50257, (2, 12)), steps=5, lr=1e-2)
    assert losses[-1] < losses[0]
    assert not torch.equal(soft_prompt(model).embedding, prompt_before)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["transformer.virtual_tokens.embedding"]


def test_generation_of_left_padded_batch_matches_peft_prompt_by_prompt(pair):
    ours, theirs = pair
    with torch.no_grad():
        soft_prompt(ours).embedding.mul_(0.3)  # a "trained" prompt: any fixed weights
        theirs.prompt_encoder.default.embedding.weight.copy_(soft_prompt(ours).embedding)
    torch.manual_seed(4)
    rows = [torch.randint(0, 50257, (k,)) for k in (3, 7, 5)]
    ids, mask = left_padded(rows)
    batched = generate(ours, ids, 8, attention_mask=mask, eos_id=None)
    for i, row in enumerate(rows):
        # peft ignores position ids for prompt tuning, so a padded row would be shifted there; compare unpadded
        reference = theirs.generate(input_ids=row[None], attention_mask=torch.ones(1, len(row), dtype=torch.long),
                                    max_new_tokens=8, do_sample=False, pad_token_id=50256)[0, len(row):]
        assert batched[i].tolist() == reference.tolist()


def test_saved_adapter_loads_in_peft_with_the_same_logits(pair, tiny_hf_dir, tmp_path):
    import peft

    ours, _ = pair
    save_adapter(ours, str(tmp_path))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "PROMPT_TUNING"
    theirs = peft.PeftModel.from_pretrained(hf_lm(tiny_hf_dir), str(tmp_path)).eval()
    ids = torch.randint(0, 50257, (2, 6))
    with torch.no_grad():
        assert (ours(ids) - theirs(input_ids=ids).logits[:, N_TOKENS:]).abs().max() < 1e-5


def test_peft_saved_adapter_loads_in_gpt2lite(tiny_hf_dir, tmp_path):
    import peft

    torch.manual_seed(5)
    theirs = peft.get_peft_model(hf_lm(tiny_hf_dir), peft.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=7, prompt_tuning_init="SAMPLE_VOCAB")).eval()
    theirs.save_pretrained(str(tmp_path))
    ours = GPT2.from_pretrained(str(tiny_hf_dir)).eval()
    load_adapter(ours, str(tmp_path))
    assert is_applied(ours) and ours.num_virtual_tokens == 7
    ids = torch.randint(0, 50257, (2, 6))
    with torch.no_grad():
        assert (ours(ids) - theirs(input_ids=ids).logits[:, 7:]).abs().max() < 1e-5


def test_bad_input_gets_clear_errors(tiny_hf_dir, tmp_path):
    model = GPT2.from_pretrained(str(tiny_hf_dir))
    for n in (0, -3, 2.5):
        with pytest.raises(ValueError, match="n_tokens > 0"):
            add_soft_prompt(copy.deepcopy(model), n)
    with pytest.raises(ValueError, match="no room in the context"):
        add_soft_prompt(copy.deepcopy(model), model.config.n_positions)
    with pytest.raises(ValueError, match="init_text"):
        add_soft_prompt(copy.deepcopy(model), 4, init="text")
    add_soft_prompt(model, 8)
    with pytest.raises(ValueError, match="already has a SoftPrompt"):
        add_soft_prompt(model, 8)
    too_long = torch.zeros(1, model.config.n_positions - 7, dtype=torch.long)
    with pytest.raises(ValueError, match="8 virtual tokens exceed the context"):
        model(too_long)
    with pytest.raises(ValueError, match="exceed the context"):
        generate(model, torch.zeros(1, 100, dtype=torch.long), 30)
    save_adapter(model, str(tmp_path))
    other = GPT2(GPT2Config.from_name("tiny").replace(n_embd=32, n_head=2))
    with pytest.raises(ValueError, match="token_dim"):
        load_adapter(other, str(tmp_path))


def test_classifier_adapter_round_trips_through_peft(tiny_hf_classifier_dir, tmp_path):
    """A classifier's prompt is saved with its trained score head (peft's SEQ_CLS modules_to_save)."""
    import peft
    import transformers

    from gpt2lite import GPT2ForSequenceClassification

    ours = GPT2ForSequenceClassification.from_pretrained(str(tiny_hf_classifier_dir)).eval()
    add_soft_prompt(ours, N_TOKENS)
    assert count_parameters(ours)[0] == N_TOKENS * 64 + 20 * 64  # the new score head trains too, as in peft
    with torch.no_grad():
        ours.score.modules_to_save.weight.normal_()  # a "trained" head (the trainable copy, as in peft)
    save_adapter(ours, str(tmp_path))
    theirs = peft.PeftModel.from_pretrained(
        transformers.GPT2ForSequenceClassification.from_pretrained(str(tiny_hf_classifier_dir)), str(tmp_path)).eval()
    reloaded = GPT2ForSequenceClassification.from_pretrained(str(tiny_hf_classifier_dir)).eval()
    load_adapter(reloaded, str(tmp_path))
    ids = torch.randint(0, 50000, (3, 8))  # no padding: transformers finds no pad token in inputs_embeds
    with torch.no_grad():
        logits = ours(ids)
        assert (logits - theirs(input_ids=ids).logits).abs().max() < 1e-5
        assert torch.equal(logits, reloaded(ids))
