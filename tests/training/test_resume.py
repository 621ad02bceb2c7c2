"""Checkpoints and resume: a run that dies mid-training and is resumed reproduces the uninterrupted run's
losses step for step (dropout on, across an epoch boundary, with evaluation), for full fine-tuning and for
an adapter-only (LoRA) checkpoint, which holds only the trainable tensors."""

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt2lite import GPT2, GPT2Config
from gpt2lite.training.checkpoint import load_checkpoint
from gpt2lite.errors import CheckpointError
from gpt2lite.training.optim import lr_factor
from gpt2lite.training.config import TrainConfig
from gpt2lite.training.loop import train
from train_helpers import Crash, collate_lm, crash_at, lm_examples, resume_config, tiny_model


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def lora_model(base_seed=0, adapter_seed=0):
    from gpt2lite.peft import add_lora

    model = tiny_model(base_seed, dropout=0.1)
    torch.manual_seed(adapter_seed)
    return add_lora(model, rank=4, alpha=8, targets=["c_attn", "c_fc"], dropout=0.1)


def interrupted_then_resumed(tmp_path, make_model, fresh_model):
    data, eval_data = lm_examples(10), lm_examples(3, seed=1)
    uninterrupted_model = make_model()
    uninterrupted = train(uninterrupted_model, data, resume_config(tmp_path / "a"), eval_dataset=eval_data,
                          collate_fn=collate_lm)
    with pytest.raises(Crash):  # dies at step 5; the last checkpoint is from step 3
        train(make_model(), data, resume_config(tmp_path / "b"), eval_dataset=eval_data, collate_fn=collate_lm,
              on_log=crash_at(5))
    assert load_checkpoint(str(tmp_path / "b" / "checkpoint.pt"))["state"]["step"] == 3
    resumed_model = fresh_model()  # different weights: everything trainable must come from the checkpoint
    resumed = train(resumed_model, data, resume_config(tmp_path / "b", resume_from=str(tmp_path / "b" / "checkpoint.pt")),
                    eval_dataset=eval_data, collate_fn=collate_lm)
    return uninterrupted, uninterrupted_model, resumed, resumed_model


def test_resume_full_finetuning_reproduces_losses_exactly(tmp_path):
    a, model_a, b, model_b = interrupted_then_resumed(
        tmp_path, lambda: tiny_model(0, dropout=0.1), lambda: tiny_model(5, dropout=0.1))
    assert [s for s, _ in b["history"]["train"]] == list(range(1, 9))
    assert b["history"]["train"] == a["history"]["train"]  # exact, dropout masks included
    assert b["history"]["val"] == a["history"]["val"]
    assert b["best_val_loss"] == a["best_val_loss"] and b["best_step"] == a["best_step"]
    for (name, pa), pb in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.equal(pa, pb), name
    # the crashed run's records after its checkpoint are dropped, so the log reads as one run
    steps = [json.loads(line)["step"] for line in open(tmp_path / "b" / "log.jsonl")
             if json.loads(line)["type"] == "train"]
    assert steps == list(range(1, 9))
    # and dropout was really on: the same run without it gives other losses
    c = train(tiny_model(0), lm_examples(10), resume_config(tmp_path / "c"), eval_dataset=lm_examples(3, seed=1),
              collate_fn=collate_lm)
    assert c["history"]["train"][0] != a["history"]["train"][0]


def test_resume_lora_from_an_adapter_only_checkpoint(tmp_path):
    a, model_a, b, model_b = interrupted_then_resumed(
        tmp_path, lambda: lora_model(), lambda: lora_model(adapter_seed=9))
    assert b["history"]["train"] == a["history"]["train"]
    assert b["history"]["val"] == a["history"]["val"]
    for (name, pa), pb in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.equal(pa, pb), name
    checkpoint = load_checkpoint(str(tmp_path / "b" / "checkpoint.pt"))
    trainable = {n for n, p in model_b.named_parameters() if p.requires_grad}
    assert set(checkpoint["trainable"]) == trainable and all("lora_" in n for n in trainable)


def test_adapter_only_checkpoints_are_small(tmp_path):
    """The weights file and the resumable checkpoint of a LoRA run hold only the adapter (and its Adam
    moments): a fraction of a full fine-tuning run's files."""
    from safetensors.torch import load_file

    sizes = {}
    for method, make in [("full", lambda: tiny_model(0)), ("lora", lora_model)]:
        model = make()
        summary = train(model, lm_examples(4), resume_config(tmp_path / method, max_steps=2, eval_every=None),
                        collate_fn=collate_lm)
        weights = load_file(summary["model_file"])
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        assert weights.keys() == trainable.keys()
        trainable_bytes = sum(p.numel() * p.element_size() for p in trainable.values())
        assert summary["checkpoint_mb"] * 2**20 == pytest.approx(trainable_bytes, rel=0.05, abs=20_000)
        sizes[method] = (summary["checkpoint_mb"], (tmp_path / method / "checkpoint.pt").stat().st_size)
    assert sizes["lora"][0] < 0.2 * sizes["full"][0] and sizes["lora"][1] < 0.2 * sizes["full"][1]
    # at GPT-2 124M scale (on the meta device): a rank-8 LoRA on c_attn holds ~1.1 MB, the full model ~476 MB
    from gpt2lite.peft import add_lora

    with torch.device("meta"):
        model = add_lora(GPT2(GPT2Config.from_name("gpt2")), rank=8, alpha=16, targets=["c_attn"])
    lora_mb = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad) / 2**20
    full_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    assert 1 < lora_mb < 5 and 450 < full_mb < 520


def test_resume_with_another_batch_size_is_refused(tmp_path):
    train(tiny_model(0), lm_examples(4), resume_config(tmp_path, max_steps=3, eval_every=None), collate_fn=collate_lm)
    with pytest.raises(CheckpointError, match="batch_size was 2 in the checkpoint and is 4 now"):
        train(tiny_model(0), lm_examples(4), resume_config(tmp_path, max_steps=3, eval_every=None, batch_size=4,
                                                        resume_from=str(tmp_path / "checkpoint.pt")),
              collate_fn=collate_lm)
    with pytest.raises(CheckpointError, match="does not fit this model"):
        train(lora_model(), lm_examples(4), resume_config(tmp_path, max_steps=3, eval_every=None,
                                                       resume_from=str(tmp_path / "checkpoint.pt")),
              collate_fn=collate_lm)


@pytest.mark.slow
def test_resume_after_a_real_sigkill(tmp_path):
    """The process is killed outright (SIGKILL: no exception handler, no cleanup) after step 5; resuming from
    its last checkpoint (step 3) reproduces the uninterrupted run's losses exactly."""
    worker = Path(__file__).resolve().parents[1] / "resume_kill_worker.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(worker.parents[1])}
    result = subprocess.run([sys.executable, str(worker), str(tmp_path / "killed")], env=env,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in open(tmp_path / "killed" / "log.jsonl")]
    assert max(steps) == 5  # it did train past its last checkpoint before dying
    uninterrupted = train(tiny_model(0, dropout=0.1), lm_examples(10), resume_config(tmp_path / "a"),
                          eval_dataset=lm_examples(3, seed=1), collate_fn=collate_lm)
    resumed = train(tiny_model(5, dropout=0.1), lm_examples(10),
                    resume_config(tmp_path / "killed", resume_from=str(tmp_path / "killed" / "checkpoint.pt")),
                    eval_dataset=lm_examples(3, seed=1), collate_fn=collate_lm)
    assert resumed["history"]["train"] == uninterrupted["history"]["train"]
    assert resumed["history"]["val"] == uninterrupted["history"]["val"]


def test_resuming_a_finished_run_trains_no_further(tmp_path):
    data = lm_examples(10)
    finished_model = tiny_model(0)
    finished = train(finished_model, data, resume_config(tmp_path / "a"), collate_fn=collate_lm)
    log = (tmp_path / "a" / "log.jsonl").read_text()
    resumed_model, records = tiny_model(5), []  # other weights: all must come from the checkpoint
    again = train(resumed_model, data, resume_config(tmp_path / "a", resume_from=str(tmp_path / "a" / "checkpoint.pt")),
                  collate_fn=collate_lm, on_log=records.append)
    assert again["steps"] == finished["steps"] == 8
    assert records == [] and (tmp_path / "a" / "log.jsonl").read_text() == log  # no step ran, none was logged
    for (name, finished_p), resumed_p in zip(finished_model.named_parameters(), resumed_model.parameters()):
        assert torch.equal(finished_p, resumed_p), name


def test_resume_with_a_changed_lr_betas_and_weight_decay_uses_the_new_values(tmp_path, caplog):
    """They used to be overwritten by the optimizer's and scheduler's saved states, silently."""
    data, saved = lm_examples(10), {}

    def keep_step_6_checkpoint(record):  # step 7's record comes after step 6's save
        if record["type"] == "train" and record["step"] == 7:
            saved.update(load_checkpoint(str(tmp_path / "checkpoint.pt")))

    with pytest.raises(Crash):  # dies at step 5; the last checkpoint is from step 3
        train(tiny_model(0), data, resume_config(tmp_path, weight_decay=0.01), collate_fn=collate_lm, on_log=crash_at(5))
    changed = dict(lr=1e-3, betas=(0.8, 0.95), weight_decay=0.1)
    with caplog.at_level(logging.WARNING, logger="gpt2lite.training.checkpoint"):
        train(tiny_model(0), data, resume_config(tmp_path, resume_from=str(tmp_path / "checkpoint.pt"), **changed),
              collate_fn=collate_lm, on_log=keep_step_6_checkpoint)
    logged = {r["step"]: r["lr"] for r in map(json.loads, open(tmp_path / "log.jsonl")) if r["type"] == "train"}
    for step, lr in logged.items():  # warmup 2 steps, then linear decay to 0 at step 8
        assert lr == pytest.approx((3e-3 if step <= 3 else 1e-3) * lr_factor(step - 1, 2, 8, "linear")), step
    decay, no_decay = saved["optimizer"]["param_groups"]  # what AdamW itself used
    assert decay["lr"] == pytest.approx(1e-3 * lr_factor(6, 2, 8, "linear")) and decay["initial_lr"] == 1e-3
    assert tuple(decay["betas"]) == tuple(no_decay["betas"]) == (0.8, 0.95)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    for name, before in [("lr", 0.003), ("betas", (0.9, 0.999)), ("weight_decay", 0.01)]:
        assert f"with {name}={changed[name]!r}; it was {before!r} in the run that wrote it" in caplog.text
