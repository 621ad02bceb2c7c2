"""A `gpt2lite` run repeats bit for bit: in another process, from its own config.yaml, and killed (SIGKILL) then
resumed. Every entry point seeds the process from the run's seed before it builds or adapts a model (a
classifier's new score head, LoRA's A, a soft prompt's init), so nothing depends on the process's own seed."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO_ROOT

WORDS = "shares rose sharply after the company reported strong earnings while analysts expected slower growth".split()
STEPS = 6


def write_data(path, task: str, n: int = 40):
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        words = [WORDS[j] for j in torch.randint(0, len(WORDS), (16,), generator=g).tolist()]
        target = " ".join(words[:5]) if task == "summarization" else i % 3
        rows.append({"document": " ".join(words) + ".", "summary": target})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def command(model, data, task: str, out, *extra):
    return ["finetune", "--model", str(model), "--data.task", task, "--data.train", str(data),
            "--data.input_column", "document", "--data.target_column", "summary", "--method.name", "lora",
            "--method.rank", "4", "--method.dropout", "0.1", "--train.output_dir", str(out), "--train.lr", "1e-2",
            "--train.batch_size", "4", "--train.max_steps", str(STEPS), "--train.save_every", "2",
            "--train.eval_every", "3", "--train.seed", "3", "--train.progress_bar", "false",
            "--generation.max_new_tokens", "4", *extra]


def gpt2lite(args, tmp_path, worker=None):
    """Run `python -m gpt2lite args` (or the kill worker) in a fresh process; returns the CompletedProcess."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf_datasets_cache")}
    program = [str(REPO_ROOT / "tests" / "cli_kill_worker.py"), *worker] if worker else ["-m", "gpt2lite"]
    return subprocess.run([sys.executable, *program, *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=600)


def finished(args, tmp_path):
    result = gpt2lite(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]


def losses(out):
    return [(r["type"], r["step"], r.get("loss", r.get("val_loss"))) for r in map(json.loads, open(out / "log.jsonl"))]


def max_difference(a, b) -> float:
    """The largest |loss difference| of two runs' log.jsonl records, step by step."""
    return max(abs(x[2] - y[2]) for x, y in zip(losses(a), losses(b)))


def assert_same_run(a, b):
    assert losses(a) == losses(b), f"max loss difference {max_difference(a, b):.3g}"
    first, second = load_file(a / "adapter" / "adapter_model.safetensors"), load_file(b / "adapter" / "adapter_model.safetensors")
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
    assert open(a / "predictions.jsonl").read() == open(b / "predictions.jsonl").read()


@pytest.mark.parametrize("task", ["summarization", "classification"])
def test_two_processes_of_one_command_give_identical_weights(task, tmp_path, tiny_hf_dir):
    """Classification: the new score head is built with the base model, before any method is applied."""
    data = write_data(tmp_path / "data.jsonl", task)
    for out in ("a", "b"):
        finished(command(tiny_hf_dir, data, task, tmp_path / out), tmp_path)
    assert_same_run(tmp_path / "a", tmp_path / "b")
    if task == "classification":  # the score head is saved with the adapter (modules_to_save)
        assert any("score" in key for key in load_file(tmp_path / "a" / "adapter" / "adapter_model.safetensors"))


@pytest.mark.slow
def test_a_rerun_from_config_yaml_and_a_killed_then_resumed_run_repeat_it(tmp_path, tiny_hf_dir):
    data = write_data(tmp_path / "data.jsonl", "summarization")
    finished(command(tiny_hf_dir, data, "summarization", tmp_path / "a"), tmp_path)
    finished(["finetune", "--config", tmp_path / "a" / "config.yaml", "--train.output_dir", tmp_path / "yaml"], tmp_path)
    assert_same_run(tmp_path / "a", tmp_path / "yaml")
    # killed after step 5 (its last checkpoint is step 4's), then the same command resumes it
    killed = gpt2lite(command(tiny_hf_dir, data, "summarization", tmp_path / "killed"), tmp_path, worker=["5"])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert max(r["step"] for r in map(json.loads, open(tmp_path / "killed" / "log.jsonl"))) == 5
    finished(command(tiny_hf_dir, data, "summarization", tmp_path / "killed", "--train.resume_from",
                     tmp_path / "killed" / "checkpoint.pt"), tmp_path)
    assert_same_run(tmp_path / "a", tmp_path / "killed")
