"""The training loop: gradient accumulation, schedules, weight decay groups, precision, evaluation and early
stopping, NaN handling, logs, and that a tiny model really learns with full fine-tuning, LoRA and prompt tuning."""

import json
import math

import pytest
import torch

from gpt2lite import GPT2, GPT2ForSequenceClassification
from gpt2lite.training.checkpoint import load_trainable
from gpt2lite.training.config import TrainConfig
from gpt2lite.training.evaluation import label_count
from gpt2lite.training.optim import lr_factor, parameter_groups
from gpt2lite.training.loop import train
from train_helpers import collate_lm, lm_examples, pattern_examples, tiny_config, tiny_model


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def config(tmp_path, **overrides):
    base = dict(output_dir=str(tmp_path), lr=1e-3, batch_size=4, epochs=None, max_steps=1, clip=None,
                eval_each_epoch=False, progress_bar=False)
    return TrainConfig(**{**base, **overrides})


def gradients(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def reference_gradients(model, rows, collate):
    """Gradients of the mean loss over every label token of `rows`, as one padded batch."""
    model.zero_grad(set_to_none=True)
    loss = model(**collate(rows))
    loss.backward()
    return loss.item(), gradients(model)


def test_accumulation_matches_one_large_batch(tmp_path):
    """3 micro-batches of 2 (different label-token counts) give the gradients of one batch of 6."""
    rows = lm_examples(6)
    counts = [label_count(collate_lm([row])["labels"]) for row in rows]
    assert len(set(counts)) > 3  # the micro-batches really differ in label tokens
    results = {}
    for batch_size, grad_accum in [(6, 1), (2, 3)]:
        model = tiny_model(0)
        records = []
        train(model, rows, config(tmp_path / f"b{batch_size}", lr=0.0, batch_size=batch_size, grad_accum=grad_accum),
              collate_fn=collate_lm, on_log=records.append)
        results[grad_accum] = (records[0]["loss"], gradients(model))  # lr=0: .grad holds the step's gradients
    loss, expected = reference_gradients(tiny_model(0), rows, collate_lm)
    for loss_k, grads in results.values():
        assert loss_k == pytest.approx(loss, abs=1e-6)
        assert grads.keys() == expected.keys()
        worst = max((grads[n] - expected[n]).abs().max().item() for n in expected)
        assert worst < 1e-5, worst
    # averaging per micro-batch instead of per token would be off by far more than the tolerance
    naive = sum(reference_gradients(tiny_model(0), rows[i:i + 2], collate_lm)[1]["transformer.wpe.weight"]
                for i in range(0, 6, 2)) / 3
    assert (naive - expected["transformer.wpe.weight"]).abs().max() > 1e-4


def test_accumulation_behind_a_soft_prompt_counts_the_first_label(tmp_path):
    """Behind a soft prompt the loss also scores labels[:, 0]: micro-batches are weighted by that count, so
    3 micro-batches of 2 still give the loss and gradients of one batch of 6."""
    from gpt2lite.peft import add_soft_prompt

    rows = [{"input_ids": row["input_ids"], "labels": row["input_ids"]} for row in lm_examples(6)]  # all labelled

    def prompted():
        model = tiny_model(0)
        torch.manual_seed(1)
        return add_soft_prompt(model, 4, init="random")

    results = {}
    for batch_size, grad_accum in [(6, 1), (2, 3)]:
        model, records = prompted(), []
        train(model, rows, config(tmp_path / f"p{batch_size}", lr=0.0, batch_size=batch_size, grad_accum=grad_accum),
              collate_fn=collate_lm, on_log=records.append)
        results[grad_accum] = (records[0]["loss"], gradients(model))
    loss, expected = reference_gradients(prompted(), rows, collate_lm)
    for loss_k, grads in results.values():
        assert loss_k == pytest.approx(loss, abs=1e-6)
        worst = max((grads[n] - expected[n]).abs().max().item() for n in expected)
        assert worst < 1e-5, worst


def test_accumulation_counts_examples_for_class_labels(tmp_path):
    """For a classifier (labels (B,)) each example weighs the same: 2 + 1 examples equal one batch of 3."""
    rows = [{"input_ids": ids["input_ids"], "labels": i % 3} for i, ids in enumerate(lm_examples(3))]
    torch.manual_seed(0)
    reference = GPT2ForSequenceClassification(tiny_config(), num_labels=3)
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    loss, expected = reference_gradients(reference, rows, collate_lm)
    model = GPT2ForSequenceClassification(tiny_config(), num_labels=3)
    model.load_state_dict(state)
    records = []
    train(model, rows, config(tmp_path, lr=0.0, batch_size=2, grad_accum=2, shuffle=False), collate_fn=collate_lm,
          on_log=records.append)
    assert records[0]["loss"] == pytest.approx(loss, abs=1e-6)
    grads = gradients(model)
    assert max((grads[n] - expected[n]).abs().max().item() for n in expected) < 1e-5


def test_lr_schedules():
    assert [lr_factor(s, 4, 10, "linear") for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(7, 4, 10, "linear") == pytest.approx(0.5)
    assert lr_factor(7, 4, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(5, 4, 10, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi / 6)))
    assert lr_factor(9, 4, 10, "constant") == 1.0


def test_logged_lr_follows_warmup_and_decay(tmp_path):
    records = []
    train(tiny_model(0), lm_examples(8), config(tmp_path, lr=0.01, batch_size=1, max_steps=8, warmup_steps=2,
                                                  schedule="linear"), collate_fn=collate_lm, on_log=records.append)
    lrs = [r["lr"] for r in records if r["type"] == "train"]
    assert lrs == pytest.approx([0.005, 0.01, 0.01, 0.01 * 5 / 6, 0.01 * 4 / 6, 0.01 * 3 / 6, 0.01 * 2 / 6, 0.01 / 6])


def test_weight_decay_groups_exclude_biases_norms_and_soft_prompts():
    from gpt2lite.peft.prompt import add_soft_prompt

    model = tiny_model(0)
    decay, no_decay = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in no_decay["params"]} == {n for n, p in model.named_parameters() if p.dim() == 1}
    assert "transformer.h.0.ln_1.weight" in {names[id(p)] for p in no_decay["params"]}
    assert "transformer.h.0.attn.c_attn.weight" in {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    add_soft_prompt(model, 4)
    decay, no_decay = parameter_groups(model, 0.1)
    assert decay["params"] == [] and [p.shape for p in no_decay["params"]] == [(4, 64)]


def test_nan_loss_stops_with_a_clear_message(tmp_path):
    model = tiny_model(0)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"training loss is nan at step 1.*nan_policy='skip'"):
        train(model, lm_examples(4), config(tmp_path), collate_fn=collate_lm)


class NanOnCall(torch.nn.Module):
    """Returns an infinite loss on the n-th forward call, the wrapped model's loss otherwise."""

    def __init__(self, model, bad_call):
        super().__init__()
        self.model, self.bad_call, self.calls = model, bad_call, 0

    def forward(self, **batch):
        self.calls += 1
        loss = self.model(**batch)
        return loss * float("inf") if self.calls == self.bad_call else loss


def test_nan_policy_skip_counts_and_skips_the_update(tmp_path):
    wrapper = NanOnCall(tiny_model(0), bad_call=2)
    before = {}

    def remember(record):
        if record["step"] == 1:
            before.update({n: p.detach().clone() for n, p in wrapper.named_parameters()})

    summary = train(wrapper, lm_examples(4), config(tmp_path, batch_size=1, max_steps=3, nan_policy="skip"),
                    collate_fn=collate_lm, on_log=remember)
    assert summary["skipped_steps"] == 1 and summary["steps"] == 3
    assert not math.isfinite(summary["history"]["train"][1][1])
    assert all(math.isfinite(loss) for _, loss in summary["history"]["train"][::2])
    assert all(torch.isfinite(p).all() for p in wrapper.parameters())


def test_log_records_and_summary(tmp_path):
    summary = train(tiny_model(0), lm_examples(8), config(tmp_path, batch_size=2, max_steps=4, log_every=2, eval_every=2),
                    eval_dataset=lm_examples(3, seed=1), collate_fn=collate_lm)
    records = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    train_records = [r for r in records if r["type"] == "train"]
    assert [r["step"] for r in train_records] == [2, 4]
    for r in train_records:
        assert {"loss", "lr", "tokens_per_s", "elapsed_s", "memory_mb", "grad_norm"} <= r.keys()
        assert r["tokens_per_s"] > 0 and r["memory_mb"] > 10
    # a logged loss is the token mean over its steps: between the two per-step losses
    steps = dict((s, l) for s, l in summary["history"]["train"])
    assert min(steps[1], steps[2]) <= train_records[0]["loss"] <= max(steps[1], steps[2])
    assert summary["steps"] == 4 and summary["stopped_by"] == "max_steps"
    assert summary["best_train_loss"] == min(r["loss"] for r in train_records)
    assert summary["trainable_params"] == summary["total_params"] == sum(p.numel() for p in tiny_model(0).parameters())
    assert summary["checkpoint_mb"] == pytest.approx((tmp_path / "best.safetensors").stat().st_size / 2**20)
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 4
    assert [s for s, _ in summary["history"]["val"]] == [r["step"] for r in records if r["type"] == "eval"] == [2, 4]


def test_early_stopping_keeps_and_restores_the_best_model(tmp_path):
    """Training on one set while evaluating on a disjoint one: val loss first falls, then rises (over-fitting);
    early stopping ends the run `patience` evaluations after the best one, whose weights come back."""
    model = tiny_model(0)
    summary = train(model, lm_examples(4), config(tmp_path, lr=3e-2, batch_size=4, max_steps=200, eval_every=2,
                                                  patience=2, schedule="constant"),
                    eval_dataset=lm_examples(4, seed=7), collate_fn=collate_lm)
    val = summary["history"]["val"]
    assert summary["stopped_by"] == "early_stopping" and summary["steps"] < 200
    best_step, best = min(val, key=lambda v: v[1])
    assert summary["best_val_loss"] == best and summary["best_step"] == best_step
    assert [s for s, _ in val if s > best_step] == [best_step + 2, best_step + 4]  # patience=2 evaluations
    reloaded = tiny_model(1)
    load_trainable(reloaded, str(tmp_path / "best.safetensors"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reloaded.state_dict().values()))
    from gpt2lite.training.evaluation import evaluate_loss

    assert evaluate_loss(model, lm_examples(4, seed=7), collate_lm, 4) == pytest.approx(best, abs=1e-6)


def test_time_budget_stops_the_run(tmp_path):
    summary = train(tiny_model(0), lm_examples(8), config(tmp_path, batch_size=1, max_steps=None, epochs=50,
                                                          time_budget_s=1e-6), collate_fn=collate_lm)
    assert summary["stopped_by"] == "time_budget" and summary["steps"] == 1
    assert (tmp_path / "checkpoint.pt").exists()


def test_bf16_autocast_on_cpu_trains_close_to_fp32(tmp_path):
    losses = {}
    for precision in ("fp32", "bf16"):
        summary = train(tiny_model(0), lm_examples(4), config(tmp_path / precision, precision=precision, max_steps=2),
                        collate_fn=collate_lm)
        losses[precision] = [loss for _, loss in summary["history"]["train"]]
    assert losses["bf16"] != losses["fp32"]  # autocast really ran in bf16
    assert losses["bf16"] == pytest.approx(losses["fp32"], abs=0.05)


def test_bad_configs_get_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="precision must be one of"):
        TrainConfig(precision="fp8")
    with pytest.raises(ValueError, match="nothing would end the run"):
        TrainConfig(epochs=None)
    with pytest.raises(ValueError, match="fp16 training needs CUDA"):
        train(tiny_model(0), lm_examples(2), config(tmp_path, precision="fp16", device="cpu"), collate_fn=collate_lm)
    with pytest.raises(ValueError, match="training set is empty"):
        train(tiny_model(0), [], config(tmp_path), collate_fn=collate_lm)
    frozen = tiny_model(0).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(frozen, lm_examples(2), config(tmp_path), collate_fn=collate_lm)


def learnable_model(method: str):
    """The tiny model with weights at the scale of a trained one (init std 0.3), so that a frozen body is
    something LoRA or a soft prompt can steer; at GPT-2's 0.02 a random body barely reacts to either."""
    from gpt2lite.peft import add_lora
    from gpt2lite.peft.prompt import add_soft_prompt

    torch.manual_seed(0)
    model = GPT2(tiny_config(dropout=0.1, initializer_range=0.3))
    if method == "lora":
        add_lora(model, rank=8, alpha=16, targets=["c_attn", "c_proj", "c_fc"])
    elif method == "prompt":
        add_soft_prompt(model, 16, generator=torch.Generator().manual_seed(0))
    return model


@pytest.mark.parametrize("method, lr", [("full", 3e-3), ("lora", 1e-2), ("prompt", 0.3)])
def test_tiny_model_learns(tmp_path, method, lr):
    """200 steps on a fixed, learnable corpus (dropout on): the loss falls below half its start, and below
    ln 6, the best a model that ignores the context could do on its 6 tokens."""
    model = learnable_model(method)
    summary = train(model, pattern_examples(16), config(tmp_path, lr=lr, batch_size=8, max_steps=200,
                                                        warmup_steps=10, clip=1.0, log_every=50),
                    collate_fn=collate_lm)
    losses = [loss for _, loss in summary["history"]["train"]]
    final = sum(losses[-10:]) / 10
    assert final < 0.5 * losses[0] and final < math.log(6), (losses[0], final)
    if method != "full":
        assert summary["trainable_params"] < 0.25 * summary["total_params"]
