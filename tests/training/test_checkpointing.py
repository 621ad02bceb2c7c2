"""Activation checkpointing: each block keeps only its input and runs again in backward. With every method,
dropout on, padding, and through train() with an interrupted and resumed run, the losses and gradients equal
those of the plain path; and it really is on (a forward keeps far fewer tensors for backward)."""

import copy

import pytest
import torch

from gpt2lite import GPT2, GPT2Config
from gpt2lite.peft import apply
from gpt2lite.training.config import TrainConfig
from gpt2lite.training.loop import train
from train_helpers import Crash, collate_lm, crash_at, lm_examples, resume_config, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

METHODS = {
    "full": {"name": "full"},
    "lora": {"name": "lora", "rank": 4, "alpha": 8, "dropout": 0.1, "targets": ["c_attn", "c_proj", "c_fc"]},
    "qlora": {"name": "qlora", "rank": 4, "alpha": 8, "dropout": 0.1, "targets": ["c_attn", "c_fc"]},
    "prompt": {"name": "prompt", "n_tokens": 4},
    "prefix": {"name": "prefix", "n_tokens": 4},
    "ia3": {"name": "ia3"},
}


def model_for(method: str) -> GPT2:
    torch.manual_seed(0)
    config = GPT2Config.from_name("tiny").replace(vocab_size=512, embd_pdrop=0.1, attn_pdrop=0.1, resid_pdrop=0.1)
    model = apply(GPT2(config), METHODS[method])
    with torch.no_grad():  # adapters that start as the identity would pass no gradient to what lies below
        for name, parameter in model.named_parameters():
            if "lora_B" in name or "ia3_" in name:
                parameter.add_(torch.randn_like(parameter) * 0.05)
    return model.train()


def loss_grads_and_saved(model, ids, mask):
    """Loss, gradients of the trainable parameters, and how many tensors the forward kept for backward."""
    saved = []
    torch.manual_seed(7)  # the dropout masks
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(1) or t, lambda t: t):
        loss = model(ids, attention_mask=mask, labels=ids)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, len(saved)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_checkpointing_gives_the_plain_losses_and_gradients(method):
    plain = model_for(method)
    checkpointed = copy.deepcopy(plain).set_activation_checkpointing(True)
    ids = torch.randint(0, 512, (3, 20), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, 15:] = 0  # padding: the mask goes through the checkpointed blocks too
    loss, grads, saved = loss_grads_and_saved(plain, ids, mask)
    loss_ckpt, grads_ckpt, saved_ckpt = loss_grads_and_saved(checkpointed, ids, mask)
    torch.testing.assert_close(loss_ckpt, loss, rtol=1e-6, atol=0)
    assert grads.keys() == grads_ckpt.keys() and grads
    for name, grad in grads.items():
        assert grads_ckpt[name] is not None and grad.abs().sum() > 0, name
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    assert saved_ckpt < saved / 2, (saved_ckpt, saved)  # the blocks kept their activations only on the plain path
    # dropout was on: another seed gives another loss
    torch.manual_seed(8)
    assert model_for(method)(ids, attention_mask=mask, labels=ids).item() != loss.item()


def test_lora_on_a_frozen_base_gets_gradients_in_the_first_block():
    """peft users meet "none of the inputs have requires_grad" with reentrant checkpointing and frozen
    embeddings; the non-reentrant kind needs no input that requires grad."""
    model = model_for("lora").set_activation_checkpointing(True)
    assert not model.transformer.wte.weight.requires_grad
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(2))
    model(ids, labels=ids).backward()
    first = model.transformer.h[0].attn.c_attn
    assert first.lora_A.weight.grad is not None and first.lora_A.weight.grad.abs().sum() > 0


def test_off_in_evaluation_and_without_gradients():
    model = model_for("lora").set_activation_checkpointing(True).eval()
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(3))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(1) or t, lambda t: t):
        model(ids, labels=ids)
    plain = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: plain.append(1) or t, lambda t: t):
        model.set_activation_checkpointing(False)(ids, labels=ids)
    assert len(saved) == len(plain)  # eval mode: the plain path


def lora_with_dropout(adapter_seed=0):
    model = tiny_model(0, dropout=0.1)
    torch.manual_seed(adapter_seed)
    return apply(model, {"name": "lora", "rank": 4, "alpha": 8, "dropout": 0.1, "targets": ["c_attn", "c_fc"]})


def test_train_with_checkpointing_resumes_to_the_plain_runs_losses(tmp_path):
    """A checkpointed run that dies at step 5 and resumes from its step-3 checkpoint has the plain run's losses."""
    data, eval_data = lm_examples(10), lm_examples(3, seed=1)
    plain = train(lora_with_dropout(), data, resume_config(tmp_path / "plain"), eval_dataset=eval_data,
                  collate_fn=collate_lm)
    config = resume_config(tmp_path / "ckpt", activation_checkpointing=True)
    with pytest.raises(Crash):
        train(lora_with_dropout(), data, config, eval_dataset=eval_data, collate_fn=collate_lm, on_log=crash_at(5))
    resumed = train(lora_with_dropout(adapter_seed=5), data,
                    resume_config(tmp_path / "ckpt", activation_checkpointing=True,
                                  resume_from=str(tmp_path / "ckpt" / "checkpoint.pt")),
                    eval_dataset=eval_data, collate_fn=collate_lm)
    losses = resumed["history"]["train"]
    assert [step for step, _ in losses] == list(range(1, 9))
    for (step, loss), (_, reference) in zip(losses, plain["history"]["train"]):
        assert loss == pytest.approx(reference, rel=1e-5), step
    for (step, loss), (_, reference) in zip(resumed["history"]["val"], plain["history"]["val"]):
        assert loss == pytest.approx(reference, rel=1e-5), step


def test_train_refuses_checkpointing_on_a_model_without_it(tmp_path):
    class Bare(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, attention_mask=None, labels=None):
            return self.weight.sum()

    with pytest.raises(ValueError, match="set_activation_checkpointing"):
        train(Bare(), lm_examples(2), TrainConfig(output_dir=str(tmp_path), activation_checkpointing=True,
                                                  progress_bar=False), collate_fn=collate_lm)
