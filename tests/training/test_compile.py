"""torch.compile on gpt2lite models (issue 20): every method traces whole (fullgraph=True) and gives eager's
loss and gradients; TrainConfig(compile=True) trains to eager's losses, saves eager's keys and compiles once
over batches of three lengths; the input checks keep their messages under compile.

Compiling is slow on two cores, so the method suite compiles with backend="aot_eager" (Dynamo's whole-graph
capture and AOTAutograd's joint forward-backward graph: what fullgraph and the custom ops' fake kernels
must get through) and Inductor itself runs for LoRA (fp32 and bf16) and in the training loop.
Inductor's fallback_random makes its dropout draw eager's numbers, so dropout can stay on in every case.
"""

import json

import pytest
import torch
import torch._dynamo
import torch._inductor.config
from safetensors.torch import load_file
from train_helpers import collate_lm, tiny_model

from gpt2lite import GPT2, GPT2Config, GPT2ForSequenceClassification, peft
from gpt2lite.loss import IGNORE_INDEX
from gpt2lite.training.config import TrainConfig
from gpt2lite.training.loop import train

VOCAB = 512
METHODS = ["full", "lora", "dora", "qlora", "prompt", "prefix", "ia3", "last_n", "bitfit", "checkpointing",
           "classifier_lora", "classifier_full"]


@pytest.fixture(autouse=True)
def compile_settings():
    """Eager's random numbers in compiled dropout; a fresh Dynamo cache per test (counts start at 0)."""
    torch._dynamo.reset()
    with torch._inductor.config.patch(fallback_random=True), torch._dynamo.config.patch(cache_size_limit=16):
        yield
    torch._dynamo.reset()


def build(method: str):
    """A tiny model with dropout (0.1 everywhere) prepared for `method`, in training mode."""
    torch.manual_seed(0)
    config = GPT2Config.from_name("tiny", vocab_size=VOCAB, n_positions=64)
    classifier = method.startswith("classifier_")
    model = GPT2ForSequenceClassification(config, num_labels=5) if classifier else GPT2(config)
    method = method.removeprefix("classifier_")
    if method == "checkpointing":  # peft's known breakage: checkpointed blocks with dropout under compile
        model.set_activation_checkpointing(True)
        method = "lora"
    peft.apply(model, {"name": "lora", "dora": True} if method == "dora" else method)
    return model.train()


def batch_for(model):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 12), generator=generator)
    if isinstance(model, GPT2ForSequenceClassification):
        return ids, torch.tensor([3, 1])
    labels = ids.clone()
    labels[0, :4] = IGNORE_INDEX  # an unlabelled prompt: the loss averages the other positions
    return ids, labels


def loss_and_grads(call, model, ids, labels, dtype=None):
    """(loss, {name: gradient}) of one forward and backward of `call` (the model or its compiled form),
    with the dropout RNG seeded; gradients read from `model`'s trainable parameters."""
    torch.manual_seed(2)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is torch.bfloat16):
        loss = call(ids, labels=labels)
    loss.backward()
    grads = {name: p.grad.float().clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach().float(), grads


def distance(a, b) -> float:
    """The largest difference of two (loss, gradients) pairs, relative to the larger magnitude of each."""
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    rel = [float((loss_a - loss_b).abs() / loss_b.abs().clamp(min=1e-12))]
    for name, grad in grads_b.items():
        rel.append(float((grads_a[name] - grad).abs().max() / grad.abs().max().clamp(min=1e-12)))
    return max(rel)


@pytest.mark.parametrize("method", METHODS)
def test_fullgraph_forward_backward_equals_eager(method):
    model = build(method)
    ids, labels = batch_for(model)
    eager = loss_and_grads(model, model, ids, labels)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    result = loss_and_grads(compiled, model, ids, labels)
    assert set(result[1]) == set(eager[1]) and eager[1]
    assert distance(result, eager) < 1e-5


def test_inductor_lora_fp32_and_bf16_equal_eager():
    """Inductor's kernels (FastLinear's oneDNN path and the chunked loss fall back to what it can lower): fp32
    to float rounding; bf16 no further from eager fp32 than eager bf16 is (twice that distance at most)."""
    model = build("lora")
    ids, labels = batch_for(model)
    compiled = torch.compile(model, fullgraph=True)
    eager_fp32 = loss_and_grads(model, model, ids, labels)
    assert distance(loss_and_grads(compiled, model, ids, labels), eager_fp32) < 1e-4
    eager_bf16 = loss_and_grads(model, model, ids, labels, torch.bfloat16)
    compiled_bf16 = loss_and_grads(compiled, model, ids, labels, torch.bfloat16)
    bf16_distance = distance(eager_bf16, eager_fp32)
    assert 0 < bf16_distance < 0.2
    assert distance(compiled_bf16, eager_fp32) <= 2 * bf16_distance


def check_messages(compiled, model, fullgraph=False):
    """The messages of eager's input checks, raised by the compiled model. The value checks raise their own
    ValueError (a custom op runs them); a dtype check fails while tracing, where fullgraph=True makes Dynamo
    raise its Unsupported error carrying the message."""
    ids, labels = batch_for(model)
    bad_ids = ids.clone()
    bad_ids[1, 3] = VOCAB + 7
    with pytest.raises(ValueError, match=rf"token ids must be in \[0, {VOCAB}\), got values in \[\d+, {VOCAB + 7}\]"):
        compiled(bad_ids, labels=labels)
    with pytest.raises((torch._dynamo.exc.Unsupported, TypeError) if fullgraph else TypeError,
                       match="input_ids must be an integer tensor of dtype torch.long"):
        compiled(ids.to(torch.int16), labels=labels)
    bad_labels = labels.clone()
    if isinstance(model, GPT2ForSequenceClassification):
        bad_labels[0] = 9
        with pytest.raises(ValueError, match=r"labels must be in \[0, 5\), got \[9, 1\]"):
            compiled(ids, labels=bad_labels)
    else:
        bad_labels[1, 5] = -3
        with pytest.raises(ValueError, match=rf"label -3 at row 1, position 5 is not a token id in \[0, {VOCAB}\)"):
            compiled(ids, labels=bad_labels)


@pytest.mark.parametrize("method", ["lora", "classifier_full"])
def test_input_check_messages_with_compile(method):
    model = build(method)
    check_messages(model, model)  # the messages as eager raises them
    for fullgraph in (False, True):
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=fullgraph, backend="aot_eager")
        loss_and_grads(compiled, model, *batch_for(model))  # compiled for good input first
        check_messages(compiled, model, fullgraph)


def three_length_examples():
    """8 examples whose micro-batches of 2 have 3 padded lengths (9, 13, 17), all labelled but a prompt."""
    generator = torch.Generator().manual_seed(4)
    rows = []
    for length in (9, 8, 13, 12, 17, 16, 9, 9):
        ids = torch.randint(1, 96, (length,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * 2 + ids[2:]})
    return rows


def run_training(directory, compile, model=None):
    model = model if model is not None else peft.apply(tiny_model(seed=0, dropout=0.1), "lora")
    config = TrainConfig(output_dir=str(directory), lr=1e-2, batch_size=2, epochs=1, shuffle=False,
                         save_every=2, progress_bar=False, compile=compile)
    return train(model, three_length_examples(), config, collate_fn=collate_lm)


def test_train_compile_matches_eager_once_over_three_lengths(tmp_path):
    eager = run_training(tmp_path / "eager", compile=False)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled = run_training(tmp_path / "compiled", compile=True)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])  # one graph for 3 lengths
    assert compiled["steps"] == eager["steps"] == 4
    for (step, loss), (eager_step, eager_loss) in zip(compiled["history"]["train"], eager["history"]["train"]):
        assert step == eager_step and loss == pytest.approx(eager_loss, rel=1e-5)
    assert eager["compile_s"] is None and compiled["compile_s"] > 0
    assert json.loads((tmp_path / "compiled" / "summary.json").read_text())["compile_s"] == compiled["compile_s"]
    for name in ("final.safetensors",):
        assert sorted(load_file(tmp_path / "compiled" / name)) == sorted(load_file(tmp_path / "eager" / name))
    saved = torch.load(tmp_path / "compiled" / "checkpoint.pt", weights_only=False)
    eager_saved = torch.load(tmp_path / "eager" / "checkpoint.pt", weights_only=False)
    assert sorted(saved["trainable"]) == sorted(eager_saved["trainable"])
    assert not any("_orig_mod" in key for key in saved["trainable"])


def test_train_given_a_compiled_model_saves_the_model_keys(tmp_path):
    model = peft.apply(tiny_model(seed=0, dropout=0.1), "lora")
    eager = run_training(tmp_path / "eager", compile=False, model=peft.apply(tiny_model(seed=0, dropout=0.1), "lora"))
    summary = run_training(tmp_path / "given", compile=False, model=torch.compile(model, backend="aot_eager"))
    assert summary["final_train_loss"] == pytest.approx(eager["final_train_loss"], rel=1e-5)
    assert sorted(load_file(tmp_path / "given" / "final.safetensors")) == sorted(load_file(tmp_path / "eager" / "final.safetensors"))
