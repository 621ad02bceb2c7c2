"""`gpt2lite estimate` (issue 22): the estimate's parts against the same step measured on real tensors, its peak
against a measured run's peak RSS (in a subprocess), the budget search, a hub id offline, and bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt2lite.cli import run as run_cli
from gpt2lite.tasks.splits import DataConfig
from gpt2lite.estimation import estimate
from gpt2lite.estimation.budget import fit_budget, parse_size, with_batch
from gpt2lite.estimation.predict import describe_run, estimate_run, model_builder
from gpt2lite.estimation.heap import Heap
from gpt2lite.estimation.trace import trace_step
from gpt2lite.training.config import TrainConfig

REPO = Path(__file__).resolve().parents[2]
MB = 2**20


def measured_step(run):
    """The step of `run` on real tensors (a random-init model), counted by the same accounting."""
    torch.manual_seed(0)
    return trace_step(model_builder(run), run.shape, run.train, run.device, run.precision, fake=False)


def real_parts(run):
    """Parameters, gradients and AdamW state of one real step of `run`, read off the real tensors."""
    torch.manual_seed(0)
    model = model_builder(run)()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable)
    batch = torch.randint(0, model.config.vocab_size, (run.shape.batch_size, run.shape.seq_len))
    model(input_ids=batch, labels=batch).backward()
    optimizer.step()
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values())
    return {"trainable_params": sum(p.numel() for p in trainable),
            "gradients_mb": sum(p.grad.numel() * p.grad.element_size() for p in trainable) / MB,
            "optimizer_state_mb": state / MB}


@pytest.mark.parametrize("method,precision,checkpointing", [
    ("lora", "fp32", False), ("full", "fp32", True), ("qlora", "fp32", False), ("prompt", "bf16", False)])
def test_parts_equal_the_measured_step(tiny_hf_dir, method, precision, checkpointing):
    train = TrainConfig(batch_size=2, precision=precision, activation_checkpointing=checkpointing, device="cpu")
    run = describe_run(str(tiny_hf_dir), method, train, DataConfig(max_length=64))
    predicted = estimate_run(run)
    for name, value in real_parts(run).items():
        assert predicted.parts[name] == value, name  # parameters, gradients and optimizer state: exactly
    real = measured_step(run)
    assert predicted.parts["weights_float_mb"] == real.weights_float / MB
    assert predicted.parts["weights_4bit_mb"] == real.weights_4bit / MB
    assert (predicted.parts["weights_4bit_mb"] > 0) == (method == "qlora")
    assert predicted.parts["activations_mb"] == pytest.approx(real.activations / MB, rel=0.10)
    assert predicted.parts["tensors_peak_mb"] == pytest.approx(real.peak_bytes / MB, rel=0.10)


def test_checkpointing_keeps_fewer_activations(tiny_hf_dir):
    result = estimate(str(tiny_hf_dir), "full", TrainConfig(batch_size=4, device="cpu"), DataConfig(max_length=128))
    assert result.parts["activations_checkpointing_mb"] < result.parts["activations_no_checkpointing_mb"] / 2
    assert result.parts["optimizer_state_mb"] == pytest.approx(2 * result.parts["gradients_mb"], rel=1e-4)


def measured_peak_rss_mb(checkpoint, method, batch_size, seq_len, precision="fp32", checkpointing=False):
    """The peak RSS of a real training run (benchmarks/estimate_child.py) in its own process."""
    spec = {"checkpoint": str(checkpoint), "method": {"name": method}, "batch_size": batch_size, "seq_len": seq_len,
            "precision": precision, "activation_checkpointing": checkpointing, "steps": 2, "device": "cpu"}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "estimate_child.py"), json.dumps(spec)],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})  # this checkout's gpt2lite
    assert done.returncode == 0, done.stderr[-2000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])["peak_rss_mb"]


@pytest.mark.parametrize("method", ["full", "lora"])
def test_peak_within_ten_percent_of_a_measured_run(tiny_hf_dir, method):
    predicted = estimate(str(tiny_hf_dir), method, TrainConfig(batch_size=8, device="cpu"), DataConfig(max_length=128))
    measured = measured_peak_rss_mb(tiny_hf_dir, method, 8, 128)
    assert predicted.peak_memory_mb == pytest.approx(measured, rel=0.10)


def test_budget_search_picks_the_largest_batch_that_fits(tiny_hf_dir):
    train = TrainConfig(batch_size=8, device="cpu")
    run = describe_run(str(tiny_hf_dir), "full", train, DataConfig(max_length=128))
    peaks = {b: estimate_run(with_batch(run, b, 8 // b), both_settings=False).peak_memory_mb for b in (2, 4)}
    budget = (peaks[2] + peaks[4]) / 2
    fit = fit_budget(run, budget)
    assert (fit.max_batch, fit.batch_size, fit.grad_accum) == (3, 2, 4) or (fit.batch_size, fit.grad_accum) == (2, 4)
    assert fit.estimate.peak_memory_mb <= budget
    larger = estimate_run(with_batch(run, fit.max_batch + 1, -(-8 // (fit.max_batch + 1))), both_settings=False)
    assert larger.peak_memory_mb > budget
    assert measured_peak_rss_mb(tiny_hf_dir, "full", fit.batch_size, 128) <= budget


def test_budget_below_the_weights_says_so(tiny_hf_dir):
    run = describe_run(str(tiny_hf_dir), "lora", TrainConfig(batch_size=4, device="cpu"), DataConfig(max_length=64))
    fit = fit_budget(run, 50)  # the baseline and weights alone take more
    assert fit.batch_size is None
    assert "not even one example" in fit.lines[0] and "the weights alone take" in fit.lines[1]
    assert any(line.startswith("a shorter max_length") for line in fit.lines)


def test_unknown_method_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="unknown method 'loraa'.*choose one of"):
        estimate("tiny", "loraa")


def test_a_model_that_is_nothing_known_is_refused(tmp_path, monkeypatch, hub_offline):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ValueError, match="cannot estimate 'someone/no-such-model'"):
        estimate("someone/no-such-model")


def test_memory_sizes():
    assert parse_size("8GB") == 8192 and parse_size("500 MiB") == 500 and parse_size(1024) == 1024
    with pytest.raises(ValueError, match="write it like 8GB"):
        parse_size("eight gigs")


def test_hub_id_offline_with_only_its_config_json(tmp_path, monkeypatch, hub_offline, tiny_hf_dir):
    snapshot = tmp_path / "hub" / "models--someone--tiny-gpt2" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text((Path(tiny_hf_dir) / "config.json").read_text())
    (tmp_path / "hub" / "models--someone--tiny-gpt2" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--tiny-gpt2" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    from_hub = estimate("someone/tiny-gpt2", "lora", TrainConfig(batch_size=2, device="cpu"), DataConfig(max_length=32))
    local = estimate(str(tiny_hf_dir), "lora", TrainConfig(batch_size=2, device="cpu"), DataConfig(max_length=32))
    assert "someone/tiny-gpt2's config.json" in from_hub.notes[0]
    assert from_hub.parts["total_params"] == local.parts["total_params"]
    assert from_hub.parts["tensors_peak_mb"] == local.parts["tensors_peak_mb"]


def test_command_line_json(tiny_hf_dir, capsys):
    result = run_cli(["estimate", "--model", str(tiny_hf_dir), "--method.name", "lora", "--train.batch_size", "2",
                      "--train.device", "cpu", "--data.max_length", "32", "--format", "json",
                      "--memory-budget", "4GB"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["peak_memory_mb"] == result["peak_memory_mb"] > printed["estimate"]["parts"]["weights_float_mb"]
    assert printed["budget"]["batch_size"] == 2 and printed["budget"]["grad_accum"] == 1


def test_heap_keeps_freed_chunks_below_the_threshold_resident():
    heap = Heap()
    heap.malloc("big", 8 * MB)  # mmapped, and when freed the threshold rises to its size
    heap.free("big")
    assert heap.resident() == 0
    heap.malloc("a", 4 * MB)  # now from the heap
    heap.malloc("b", 1 * MB)
    heap.free("a")  # a hole under b: still resident
    assert heap.resident() >= 5 * MB
    heap.malloc("c", 3 * MB)  # fits in a's hole: nothing grows
    assert heap.resident() < 5 * MB + 4096


def test_time_probe_counts_steps_as_train_does(tiny_hf_dir):
    import math

    from gpt2lite.training.distributed import World
    from gpt2lite.estimation.timing import time_steps
    from gpt2lite.training.run import epoch_micro_batches

    train = TrainConfig(batch_size=3, grad_accum=2, device="cpu")
    timing = time_steps(describe_run(str(tiny_hf_dir), "lora", train, DataConfig(max_length=32)), steps=1)
    assert timing.tokens_per_s == pytest.approx(3 * 2 * 32 / timing.step_s)
    micro_batches = epoch_micro_batches(100, 0, train, None, World())
    assert timing.steps_for(100, epochs=2) == 2 * math.ceil(len(micro_batches) / 2)
    assert timing.steps_for(100, epochs=2, max_steps=5) == 5
    assert timing.total_s(100, epochs=2) == pytest.approx(timing.steps_for(100, 2) * timing.step_s)
