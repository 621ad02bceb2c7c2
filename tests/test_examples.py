"""examples/lora_summarize.py, the design's entry point, run as a user runs it: in its own process, on a local
model and a JSONL file with column names of its own; its flags are the library's dataclasses, with defaults;
with no arguments it falls back offline to the small pretrained base and the docstring task."""

import dataclasses
import importlib.util
import inspect
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO_ROOT
from gpt2lite import GPT2
from gpt2lite.tasks.splits import DataConfig, load_splits
from gpt2lite.generation.decoding import GenerationConfig
from gpt2lite.peft import MethodConfig, load_adapter
from gpt2lite.experiment.pretrain import PretrainConfig
from gpt2lite.tasks import docstring_corpus
from gpt2lite.training.config import TrainConfig

SCRIPT = REPO_ROOT / "examples" / "lora_summarize.py"
WORDS = ("the council approved a new budget for schools and roads after a long debate while residents asked "
         "for lower taxes and more buses in the city").split()
COLUMNS = ["--data.input_column", "document", "--data.target_column", "summary"]


def run_script(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(cwd / "hf_datasets_cache"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def news_file(path, n=30):
    """{"id", "document", "summary"} rows: not the script's default column names (article / highlights)."""
    g = torch.Generator().manual_seed(0)
    with open(path, "w") as f:
        for i in range(n):
            words = [WORDS[j] for j in torch.randint(0, len(WORDS), (20,), generator=g).tolist()]
            f.write(json.dumps({"id": i, "document": f"Report {i}: {' '.join(words)}.",
                                "summary": " ".join(words[:5])}) + "\n")
    return path


def quick(tiny_hf_dir, data, output_dir):
    return ["--model", tiny_hf_dir, "--data.train", data, *COLUMNS, "--method.rank", "4", "--train.lr", "1e-2",
            "--train.max_steps", "3", "--train.eval_every", "3", "--train.batch_size", "4",
            "--train.progress_bar", "false", "--train.output_dir", output_dir, "--generation.max_new_tokens", "6"]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, tiny_hf_dir):
    root = tmp_path_factory.mktemp("lora_summarize")
    data = news_file(root / "news.jsonl")
    return root, data, root / "run", run_script(*quick(tiny_hf_dir, data, root / "run"), cwd=root)


def test_the_script_trains_lora_on_a_local_file_with_its_own_columns(first_run, tiny_hf_dir):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    root, data, out, stdout = first_run
    config = json.load(open(out / "adapter" / "adapter_config.json"))
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 16.0
    assert sorted(config["target_modules"]) == ["c_attn", "c_fc", "c_proj"] and config["lora_dropout"] == 0.05
    assert config["base_model_name_or_path"] == str(tiny_hf_dir.resolve())
    # peft loads the adapter onto transformers' GPT-2 and computes what gpt2lite's model does with it
    ours = load_adapter(GPT2.from_pretrained(tiny_hf_dir), str(out / "adapter")).eval()
    theirs = peft.PeftModel.from_pretrained(transformers.GPT2LMHeadModel.from_pretrained(tiny_hf_dir),
                                            str(out / "adapter")).eval()
    ids = torch.randint(0, 50257, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
        assert (ours(ids) - GPT2.from_pretrained(tiny_hf_dir).eval()(ids)).abs().max() > 1e-3  # it was trained
    # ROUGE of the test split, printed and in the report; the test split is the file's own, by its columns
    row = json.load(open(out / "report.json"))["rows"][0]
    per_block = (64 + 3 * 64) + (64 + 64) + (64 + 4 * 64) + (4 * 64 + 64)  # c_attn, attn.c_proj, c_fc, mlp.c_proj
    assert row["method"] == "lora" and row["steps"] == 3 and row["trainable_params"] == 2 * 4 * per_block
    printed = re.search(r"test ROUGE-1 / 2 / L / Lsum: (\S+) / (\S+) / (\S+) / (\S+)", stdout).groups()
    assert list(printed) == [f"{row[k]:.2f}" for k in ("rouge1", "rouge2", "rougeL", "rougeLsum")]
    test = load_splits(DataConfig(train=str(data), input_column="document", target_column="summary")).test
    predictions = [json.loads(line) for line in open(out / "predictions.jsonl")]
    assert [p["source"] for p in predictions] == list(test["document"]) and len(predictions) == 3
    # step 7: the adapter reloaded from disk summarizes the first test articles as the run's evaluation did
    blocks = stdout.split("\n--- test article ")[1:]
    assert len(blocks) == 3
    for block, prediction in zip(blocks, predictions):
        assert f"reference: {prediction['reference']}\ngenerated: {prediction['prediction']}" in block


def test_a_second_run_of_the_same_command_writes_the_same_adapter(first_run, tiny_hf_dir):
    """The process is seeded from train.seed before LoRA is added: its A matrices, and so the run, repeat."""
    root, data, out, _ = first_run
    run_script(*quick(tiny_hf_dir, data, root / "again"), "--show", "0", cwd=root)
    first, second = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (out, root / "again"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def help_defaults(text):
    """{flag: its default as --help prints it} for every '--group.field' and '--name' option."""
    defaults = {}
    for flag, body in re.findall(r"\n  (--[\w.]+)(.*?)(?=\n  --|\n\n|\Z)", text, flags=re.S):
        default = re.search(r"default: (.*?)\)\s*$", " ".join(body.split()))
        if default:
            defaults[flag] = default.group(1)
    return defaults


def test_help_lists_every_setting_with_its_default(tmp_path):
    shown = run_script("--help", cwd=tmp_path)
    defaults = help_defaults(shown)
    for group, cls in (("data", DataConfig), ("method", MethodConfig), ("train", TrainConfig),
                       ("generation", GenerationConfig), ("pretrain", PretrainConfig)):
        missing = [f.name for f in dataclasses.fields(cls) if f"--{group}.{f.name}" not in defaults]
        assert not missing, f"--help lacks {group} flags {missing}"
    assert {k: defaults[k] for k in ("--model", "--data.train", "--data.input_column", "--data.target_column",
                                     "--data.dataset", "--method.name", "--method.rank", "--method.alpha",
                                     "--method.targets", "--train.epochs", "--train.max_steps",
                                     "--train.output_dir", "--fallback")} == {
        "--model": "gpt2", "--data.train": "null", "--data.input_column": "null", "--data.target_column": "null",
        "--data.dataset": "cnn_dailymail", "--method.name": "lora", "--method.rank": "8", "--method.alpha": "16.0",
        "--method.targets": "('c_attn', 'c_proj', 'c_fc')", "--train.epochs": "null", "--train.max_steps": "100",
        "--train.output_dir": "runs/lora_summarize", "--fallback": "True"}


def load_example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", REPO_ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_arguments_it_falls_back_offline_to_the_pretrained_base_and_docstrings(tmp_path, monkeypatch,
                                                                                         capsys):
    """The defaults (model gpt2, CNN/DailyMail) offline: a small base pretrained here and the docstring task
    (both smaller, to be quick); the adapter names the base written beside it."""
    monkeypatch.setenv("GPT2LITE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("gpt2lite.tasks.docstrings.pretraining_texts",
                        lambda **kwargs: [f"def {w}(x):\nReturn the {w} of x, or None." for w in WORDS] * 20)
    monkeypatch.setattr("gpt2lite.tasks.splits.docstring_corpus", lambda *args: docstring_corpus(60))  # the first 60
    example = load_example("lora_summarize")
    defaults = {name: p.default for name, p in inspect.signature(example.main).parameters.items()}
    assert defaults["model"] == "gpt2" and defaults["data"].train is None and defaults["fallback"] is True
    data = dataclasses.replace(example.DATA, max_length=64, max_train_samples=4, max_validation_samples=2,
                               max_test_samples=2)
    train = dataclasses.replace(example.TRAIN, max_steps=2, batch_size=2, eval_every=2, progress_bar=False,
                                output_dir=str(tmp_path / "out"))
    pretrain = PretrainConfig(preset="tiny", steps=1, batch_size=1, warmup_steps=0)
    result = example.main(data=data, train=train, generation=GenerationConfig(max_new_tokens=4), pretrain=pretrain,
                          show=1)
    stdout = capsys.readouterr().out
    assert "SMALL OFFLINE-PRETRAINED 'tiny' model, NOT GPT-2" in stdout and "OFFLINE FALLBACK DATA" in stdout
    config = json.load(open(tmp_path / "out" / "adapter" / "adapter_config.json"))
    assert config["base_model_name_or_path"] == str(tmp_path / "out" / "base_model")
    reloaded = load_adapter(GPT2.from_pretrained(config["base_model_name_or_path"]), str(tmp_path / "out" / "adapter"))
    assert reloaded.config.n_layer == 2 and len(result["generated"]) == 1 and "rougeL" in result["scores"]
    assert json.load(open(tmp_path / "out" / "report.json"))["rows"][0]["quality_note"]  # not GPT-2 results
    # run again: the base now comes from the cache, not pretrained first; the run repeats all the same
    example.main(data=data, train=dataclasses.replace(train, output_dir=str(tmp_path / "again")),
                 generation=GenerationConfig(max_new_tokens=4), pretrain=pretrain, show=0)
    assert "loaded from the cache" in capsys.readouterr().out
    first, second = (load_file(tmp_path / d / "adapter" / "adapter_model.safetensors") for d in ("out", "again"))
    assert all(torch.equal(first[k], second[k]) for k in first)
