"""The `gpt2lite` command line: flags generated from the dataclasses, YAML configs, the data splits, and a new
user's path from a JSONL file to an adapter, predictions and a report, then generation from the adapter."""

import dataclasses
import inspect
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import REPO_ROOT
from gpt2lite.cli import run
from gpt2lite.cli.parser import COMMANDS
from gpt2lite.tasks.splits import DataConfig, load_splits
from gpt2lite.generation.decoding import GenerationConfig
from gpt2lite.peft import MethodConfig
from gpt2lite.experiment.search import SearchConfig
from gpt2lite.tasks import DataError
from gpt2lite.training.config import TrainConfig

WORDS = ("market shares rose sharply after the company reported strong quarterly earnings while analysts "
         "expected slower growth in the coming year as rates stay high").split()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def news_rows(n, seed=0):
    """Short {"id", "document", "summary"} rows (short enough that no source is truncated)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        words = [WORDS[j] for j in torch.randint(0, len(WORDS), (24,), generator=g).tolist()]
        rows.append({"id": i, "document": f"Story {i}: " + " ".join(words) + ".", "summary": " ".join(words[:6])})
    return rows


pytestmark = pytest.mark.usefixtures("hub_offline")


QUICK = ["--train.max_steps", "2", "--train.batch_size", "4", "--train.progress_bar", "false",
         "--generation.max_new_tokens", "6"]


@pytest.mark.parametrize("command, groups", [
    ("finetune", {"data": DataConfig, "method": MethodConfig, "train": TrainConfig, "generation": GenerationConfig,
                  "search": SearchConfig}),
    ("compare", {"data": DataConfig, "train": TrainConfig, "generation": GenerationConfig, "search": SearchConfig}),
    ("generate", {"generation": GenerationConfig}),
])
def test_every_dataclass_field_is_a_flag_with_its_default_in_help(command, groups, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run([command, "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # help lines are wrapped
    for group, cls in groups.items():
        defaults = inspect.signature(COMMANDS[command]).parameters[group].default  # e.g. TrainConfig(...)
        assert isinstance(defaults, cls)
        for field in dataclasses.fields(cls):
            flag = f"--{group}.{field.name}"
            after = text[text.rindex(flag + " "):]  # the options section, not the usage line
            # jsonargparse's "((required, )type: ..., default: ...)" after the field's help
            shown = re.search(r"\((?:required, )?type: .*?, default: (.*?)\)", after).group(1)
            value = getattr(defaults, field.name)
            expected = "null" if value is None else str(value)
            assert shown and expected.startswith(shown), (flag, shown, expected)  # a tuple's ")" ends the match
    assert "the shuffle that cuts splits" in text or command == "generate"  # field comments become the help


def test_a_yaml_config_then_flags_override_it(tmp_path):
    from gpt2lite.cli.parser import build_parser

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"data": {"train": "a.jsonl", "seed": 3}, "train": {"lr": 0.5, "epochs": 4},
                                      "method": {"name": "lora", "rank": 4, "targets": ["c_attn", "c_proj"]}}))
    parser = build_parser()
    parsed = parser.instantiate(parser.parse_args(["finetune", "--config", str(config), "--train.lr", "0.25"]))
    options = parsed.finetune
    assert options.train == TrainConfig(output_dir="runs/finetune", lr=0.25, epochs=4)
    assert options.data == DataConfig(train="a.jsonl", seed=3)
    assert options.method == MethodConfig(name="lora", rank=4, targets=("c_attn", "c_proj"))


def test_one_file_is_split_into_three_disjoint_seeded_parts(tmp_path):
    path = write_jsonl(tmp_path / "news.jsonl", news_rows(50))
    splits = load_splits(DataConfig(train=str(path), input_column="document", target_column="summary"))
    ids = [set(table["id"]) for table in (splits.train, splits.validation, splits.test)]
    assert [len(s) for s in ids] == [40, 5, 5]
    assert ids[0] | ids[1] | ids[2] == set(range(50)) and not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert "train: 40 rows" in splits.description and "test: 5 rows from 10% of" in splits.description
    again = load_splits(DataConfig(train=str(path), input_column="document", target_column="summary"))
    assert set(again.test["id"]) == ids[2]
    other = load_splits(DataConfig(train=str(path), input_column="document", target_column="summary", seed=1))
    assert set(other.test["id"]) != ids[2]
    # a validation file of its own: only the test split is cut from the train file
    validation = write_jsonl(tmp_path / "valid.jsonl", news_rows(7, seed=1))
    splits = load_splits(DataConfig(train=str(path), validation=str(validation)))
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (45, 7, 5)


def test_sample_caps_stream_only_the_first_rows_of_a_hub_dataset(monkeypatch):
    """A capped run asks the hub for the rows it uses (load_table's max_rows), not whole splits: the online
    demo trains on 2,000 CNN/DailyMail articles without downloading the 287,113 of the train split."""
    import gpt2lite.tasks.splits

    asked = {}

    def fake_load_table(dataset=None, config_name=None, data_files=None, split="train", max_rows=None):
        asked[split] = max_rows
        return [{"article": f"article {i}", "highlights": f"summary {i}", "text": "t", "label": 0}
                for i in range(max_rows or 30)]

    monkeypatch.setattr(gpt2lite.tasks.splits, "load_table", fake_load_table)
    splits = load_splits(DataConfig(dataset="cnn_dailymail", dataset_config="3.0.0", max_train_samples=20,
                                    max_validation_samples=5, max_test_samples=7))
    assert asked == {"train": 20, "validation": 5, "test": 7}
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (20, 5, 7)
    asked.clear()
    load_splits(DataConfig(task="classification", dataset="news", max_train_samples=12, num_labels=2))
    assert asked == {"train": 12, "validation": None, "test": None}
    asked.clear()
    load_splits(DataConfig(dataset="cnn_dailymail"))
    assert asked == {"train": None, "validation": None, "test": None}  # no caps: whole splits


def test_bad_data_options_name_the_problem(tmp_path):
    path = write_jsonl(tmp_path / "tiny.jsonl", news_rows(2))
    with pytest.raises(DataError, match="tiny.jsonl' has 2 rows: too few"):
        load_splits(DataConfig(train=str(path)))
    with pytest.raises(DataError, match="--data.train"):
        load_splits(DataConfig())
    with pytest.raises(ValueError, match="data.task must be one of"):
        DataConfig(task="translation")
    with pytest.raises(ValueError, match="need a data.train file"):
        DataConfig(validation="v.jsonl")


def test_every_generation_field_reaches_generate(monkeypatch):
    """The CLI's --generation.* options arrive at generate() whole (beam search, stop strings, penalties),
    with the tokenizer that stop strings need."""
    import importlib

    from gpt2lite.tasks.builders import generate_texts
    from gpt2lite.tokenizer import Tokenizer

    seen = {}

    def fake_generate(model, input_ids, max_new_tokens=None, attention_mask=None, *, config=None, tokenizer=None):
        seen.update(config=config, tokenizer=tokenizer)
        return torch.zeros(input_ids.size(0), 1, dtype=torch.long)

    # the module, not the function of the same name that gpt2lite/__init__.py exports
    monkeypatch.setattr(importlib.import_module("gpt2lite.generation.decoding"), "generate", fake_generate)
    generation = GenerationConfig(max_new_tokens=5, num_beams=3, length_penalty=2.0, early_stopping=True,
                                  repetition_penalty=1.5, no_repeat_ngram_size=2, min_new_tokens=1,
                                  stop_strings=("\n",))
    tokenizer = Tokenizer()
    model = torch.nn.Linear(1, 1)
    generate_texts(model, [[1, 2, 3]], tokenizer, generation)
    assert seen["config"] == generation and seen["tokenizer"] is tokenizer


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, tiny_hf_dir):
    """The README's first command: a JSONL file -> a LoRA adapter, predictions.jsonl and a report."""
    root = tmp_path_factory.mktemp("cli_finetune")
    data = write_jsonl(root / "news.jsonl", news_rows(40))
    out = root / "run"
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    result = run(["finetune", "--model", str(tiny_hf_dir), "--data.train", str(data), "--data.input_column",
                  "document", "--data.target_column", "summary", "--method.name", "lora", "--method.rank", "4",
                  "--train.output_dir", str(out), "--train.lr", "1e-2", *QUICK])
    return root, data, out, result


def test_finetune_writes_a_peft_adapter_predictions_and_a_report(finetuned, tiny_hf_dir):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from gpt2lite.experiment.outputs import load_for_inference

    root, data, out, result = finetuned
    config = json.load(open(out / "adapter" / "adapter_config.json"))
    assert config["base_model_name_or_path"] == os.path.abspath(tiny_hf_dir) and config["r"] == 4
    # peft loads the adapter onto transformers' GPT-2 and computes what gpt2lite's model does
    ours, _ = load_for_inference(None, str(out / "adapter"), device="cpu")
    theirs = peft.PeftModel.from_pretrained(transformers.GPT2LMHeadModel.from_pretrained(tiny_hf_dir),
                                            str(out / "adapter")).eval()
    ids = torch.randint(0, 50257, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
        base = transformers.GPT2LMHeadModel.from_pretrained(tiny_hf_dir)(ids).logits
        assert (ours(ids) - base).abs().max() > 1e-3  # the adapter holds what was trained
    # predictions of the test split only: 10% of the file, disjoint from what was trained on
    predictions = [json.loads(line) for line in open(out / "predictions.jsonl")]
    assert len(predictions) == 4 and set(predictions[0]) == {"source", "reference", "prediction"}
    splits = load_splits(DataConfig(train=str(data), input_column="document", target_column="summary"))
    assert [p["source"] for p in predictions] == list(splits.test["document"])
    assert not {p["source"] for p in predictions} & set(splits.train["document"])
    report = json.load(open(out / "report.json"))
    assert [row["method"] for row in report["rows"]] == ["lora"] and report["rows"][0]["steps"] == 2
    assert report["rows"][0]["trainable_params"] == 2 * 4 * (64 + 3 * 64)
    assert report["rows"][0]["n_examples"] == 4 and report["random_init"] is False
    assert yaml.safe_load(open(out / "config.yaml"))["data"]["input_column"] == "document"


def test_generate_from_the_saved_adapter_reproduces_its_predictions(finetuned, capsys):
    """The README's second command: the run's own test articles give exactly its predictions.jsonl."""
    root, _, out, _ = finetuned
    predictions = [json.loads(line) for line in open(out / "predictions.jsonl")]
    prompts = write_jsonl(root / "prompts.jsonl", [{"document": p["source"]} for p in predictions])
    rows = run(["generate", "--adapter", str(out / "adapter"), "--prompts", str(prompts), "--output",
                str(root / "generated.jsonl"), "--generation.max_new_tokens", "6"])
    assert [row["prediction"] for row in rows] == [p["prediction"] for p in predictions]
    assert [json.loads(line) for line in open(root / "generated.jsonl")] == rows
    assert "TL;DR" in capsys.readouterr().out  # the run's template, read from its config.yaml
    single = run(["generate", "--adapter", str(out / "adapter"), "--prompt", predictions[0]["source"],
                  "--generation.max_new_tokens", "6"])
    assert single[0]["prediction"] == predictions[0]["prediction"]


def test_evaluate_scores_the_adapter_as_finetune_did(finetuned):
    root, data, out, result = finetuned
    evaluated = run(["evaluate", "--adapter", str(out / "adapter"), "--data.train", str(data),
                     "--data.input_column", "document", "--data.target_column", "summary",
                     "--generation.max_new_tokens", "6", "--output_dir", str(root / "evaluation")])
    trained = result["rows"][0]
    for key in ("rouge1", "rougeL", "bleu", "chrf", "n_examples"):
        assert evaluated["rows"][0][key] == pytest.approx(trained[key]), key
    assert evaluated["rows"][0]["best_val_loss"] == pytest.approx(trained["best_val_loss"], rel=1e-5)
    assert open(root / "evaluation" / "predictions.jsonl").read() == open(out / "predictions.jsonl").read()


def test_merge_writes_a_checkpoint_that_equals_the_adapter(finetuned):
    from gpt2lite import GPT2
    from gpt2lite.experiment.outputs import load_for_inference

    root, _, out, _ = finetuned
    run(["merge", "--adapter", str(out / "adapter"), "--output", str(root / "merged")])
    adapted, _ = load_for_inference(None, str(out / "adapter"), device="cpu")
    merged = GPT2.from_pretrained(str(root / "merged")).eval()
    ids = torch.randint(0, 50257, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), adapted(ids), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="only LoRA merges"):
        prompt_dir = root / "prompt_adapter"
        from gpt2lite.peft import add_soft_prompt, save_adapter

        save_adapter(add_soft_prompt(GPT2.from_pretrained(str(root / "merged")), 4), str(prompt_dir),
                     base_model_name_or_path=str(root / "merged"))
        run(["merge", "--adapter", str(prompt_dir), "--output", str(root / "nowhere")])


def test_full_finetuning_writes_a_checkpoint_transformers_loads_with_its_tokenizer(tmp_path, tiny_hf_dir):
    """model/ loads in transformers (AutoTokenizer offline included) and its greedy generations are the
    run's predictions."""
    transformers = pytest.importorskip("transformers")
    from gpt2lite import Tokenizer

    data = write_jsonl(tmp_path / "news.jsonl", news_rows(30))
    out = tmp_path / "full"
    run(["finetune", "--model", str(tiny_hf_dir), "--data.train", str(data), "--data.input_column", "document",
         "--data.target_column", "summary", "--method.name", "full", "--train.output_dir", str(out),
         "--train.lr", "1e-3", *QUICK])
    assert not (out / "adapter").exists()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out / "model")
    ours = Tokenizer()
    for text in ("Hello, world!", "  spaces\n\nand\ttabs ", "Ünïcödé 日本語 🤗<|endoftext|>", WORDS[0] * 3):
        assert tokenizer.encode(text) == ours.encode(text)
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.eos_token_id == 50256
    model = transformers.AutoModelForCausalLM.from_pretrained(out / "model").eval()
    base = transformers.GPT2LMHeadModel.from_pretrained(tiny_hf_dir)
    assert not torch.equal(model.transformer.h[0].attn.c_attn.weight, base.transformer.h[0].attn.c_attn.weight)
    for prediction in (json.loads(line) for line in open(out / "predictions.jsonl")):
        prompt = tokenizer(prediction["source"] + "\nTL;DR:", return_tensors="pt")
        output = model.generate(**prompt, max_new_tokens=6, do_sample=False, pad_token_id=50256)
        new = output[0, prompt.input_ids.shape[1]:].tolist()
        new = new[:new.index(50256)] if 50256 in new else new
        assert tokenizer.decode(new).strip() == prediction["prediction"]


def test_search_runs_trials_and_retrains_the_best(tmp_path, tiny_hf_dir):
    pytest.importorskip("optuna")
    data = write_jsonl(tmp_path / "news.jsonl", news_rows(30))
    result = run(["finetune", "--model", str(tiny_hf_dir), "--data.train", str(data), "--data.input_column",
                  "document", "--data.target_column", "summary", "--train.output_dir", str(tmp_path / "run"),
                  "--search.trials", "2", "--search.retrain_best_model", "true", "--search.train_samples", "8",
                  *QUICK])
    found = json.load(open(tmp_path / "run" / "search.json"))
    assert [t["number"] for t in found["trials"]] == [0, 1]
    assert set(found["best_params"]) == {"lr", "rank", "alpha", "dropout", "epochs"}
    assert found["best_value"] == min(t["value"] for t in found["trials"])
    for n in (0, 1):
        assert json.load(open(tmp_path / "run" / f"trial_{n}" / "summary.json"))["steps"] <= 2
    row = result["rows"][0]
    assert row["method"] == "lora (best trial, retrained)"
    assert row["trainable_params"] == 2 * found["best_params"]["rank"] * (64 + 3 * 64)
    config = json.load(open(tmp_path / "run" / "adapter" / "adapter_config.json"))
    assert config["r"] == found["best_params"]["rank"]


def test_search_without_optuna_is_a_clear_error(monkeypatch):
    import builtins

    from gpt2lite.experiment.search import require_optuna

    real_import = builtins.__import__

    def no_optuna(name, *args, **kwargs):
        if name == "optuna":
            raise ImportError("no optuna")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_optuna)
    with pytest.raises(ImportError, match="pip install optuna"):
        require_optuna()


def test_compare_refuses_two_runs_with_one_label(tmp_path):
    with pytest.raises(ValueError, match=r"share the label\(s\) \['lora'\]"):
        run(["compare", "--data.train", "x.jsonl", "--runs", '[{"method": {"name": "lora"}}, '
             '{"method": {"name": "lora", "rank": 4}}]', "--train.output_dir", str(tmp_path)])


def test_python_m_gpt2lite_runs_and_the_library_imports_without_jsonargparse():
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    shown = subprocess.run([sys.executable, "-m", "gpt2lite", "--help"], capture_output=True, text=True, env=env)
    assert shown.returncode == 0 and "finetune" in shown.stdout and "merge" in shown.stdout
    code = ("import sys; sys.modules['jsonargparse'] = None\n"
            "import gpt2lite, gpt2lite.experiment.runs, gpt2lite.tasks.splits, gpt2lite.cli, gpt2lite.cli.pipeline\n"
            "from gpt2lite.cli import run\n"
            "try:\n    run(['finetune', '--help'])\nexcept SystemExit as e:\n    print('EXIT', e.code)\n")
    blocked = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert blocked.returncode == 0, blocked.stderr
    assert "EXIT the gpt2lite command line needs jsonargparse" in blocked.stdout
