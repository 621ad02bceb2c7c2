"""A run's settings are checked before any work, what `evaluate` says an adapter trains is what it trains (peft's
count), and a run that max_steps ends before its first evaluation still reports a validation loss."""

import json

import pytest

from train_helpers import collate_lm, lm_examples, tiny_model

import gpt2lite.cli.pipeline
from gpt2lite.cli import run
from gpt2lite.tasks.splits import DataConfig
from gpt2lite.peft import MethodConfig
from gpt2lite.training.config import TrainConfig
from gpt2lite.training.evaluation import evaluate_loss
from gpt2lite.training.loop import train


@pytest.fixture
def no_work(monkeypatch):
    """Reading data or building a model fails the test: the checks must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("data or model work began before the settings were checked")

    for name in ("load_splits", "load_base_model", "build_task"):
        monkeypatch.setattr(gpt2lite.cli.pipeline, name, refuse)


@pytest.mark.parametrize("flags, message", [
    (["--method.rank", "0"], "rank must be a positive integer, got 0"),
    (["--method.alpha", "-1"], "alpha must be a positive number"),
    (["--method.dropout", "1.5"], r"dropout must be in \[0, 1\)"),
    (["--method.bias", "some"], "bias must be one of"),
    (["--method.targets", "[]"], "targets must be None"),
    (["--method.name", "prompt", "--method.n_tokens", "0"], "n_tokens must be a positive integer"),
    (["--method.name", "last_n", "--method.n_layers", "-1"], "n_layers must be an integer >= 0"),
    (["--data.max_length", "64", "--data.stride", "65"], "data.stride=65 exceeds"),
    (["--data.template", "{article} no summary"], "must hold '{article}' and '{summary}'"),
    (["--data.task", "language_modeling", "--data.template", "no placeholder"], "must hold '{text}' once"),
])
def test_bad_settings_are_refused_before_any_data_or_model_work(flags, message, no_work, tmp_path, capsys):
    with pytest.raises((ValueError, SystemExit)) as error:
        run(["finetune", "--data.train", str(tmp_path / "missing.jsonl"), "--train.output_dir", str(tmp_path / "out"),
             *flags])
    assert __import__("re").search(message, str(error.value) + capsys.readouterr().err)


def test_a_compared_run_with_a_bad_method_is_refused_before_any_work(no_work, tmp_path):
    with pytest.raises((ValueError, SystemExit), match="rank must be a positive integer"):
        run(["compare", "--data.train", str(tmp_path / "missing.jsonl"), "--train.output_dir", str(tmp_path),
             "--runs", '[{"method": {"name": "lora"}}, {"method": {"name": "lora", "rank": 0}, "label": "r0"}]'])
    with pytest.raises(ValueError, match="dropout must be in"):
        MethodConfig(name="qlora", dropout=1.0)
    with pytest.raises(ValueError, match="stride"):
        DataConfig(max_length=8, stride=9)


def test_a_run_that_stops_before_its_first_evaluation_evaluates_at_the_end(tmp_path):
    """max_steps 2 of a 5-step epoch, no eval_every: summary.json has the final model's validation loss."""
    validation = lm_examples(3, seed=1)
    model = tiny_model(0)
    config = TrainConfig(output_dir=str(tmp_path / "a"), batch_size=2, max_steps=2, restore_best=False,
                         progress_bar=False)
    summary = train(model, lm_examples(10), config, eval_dataset=validation, collate_fn=collate_lm)
    saved = json.load(open(tmp_path / "a" / "summary.json"))
    assert saved["best_val_loss"] == summary["best_val_loss"] == evaluate_loss(model, validation, collate_lm, 2)
    assert saved["best_step"] == 2 and saved["history"]["val"] == [[2, saved["best_val_loss"]]]
    records = [json.loads(line) for line in open(tmp_path / "a" / "log.jsonl")]
    assert [r["step"] for r in records if r["type"] == "eval"] == [2]
    # evaluation off (no eval_every, none at epoch ends): nothing is evaluated
    off = TrainConfig(output_dir=str(tmp_path / "off"), batch_size=2, max_steps=2, eval_each_epoch=False,
                      progress_bar=False)
    assert train(tiny_model(0), lm_examples(10), off, eval_dataset=validation, collate_fn=collate_lm)[
        "best_val_loss"] is None
    # a run that did evaluate is not evaluated once more at its end
    every = TrainConfig(output_dir=str(tmp_path / "every"), batch_size=2, max_steps=3, eval_every=2,
                        progress_bar=False)
    assert [step for step, _ in train(tiny_model(0), lm_examples(10), every, eval_dataset=validation,
                                      collate_fn=collate_lm)["history"]["val"]] == [2]


PEFT_CONFIGS = {"lora": lambda peft, task: peft.LoraConfig(r=4, target_modules=["c_attn"], task_type=task,
                                                          fan_in_fan_out=True),
                "ia3": lambda peft, task: peft.IA3Config(task_type=task),
                "prompt": lambda peft, task: peft.PromptTuningConfig(task_type=task, num_virtual_tokens=5),
                "prefix": lambda peft, task: peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=5)}


@pytest.mark.parametrize("method", sorted(PEFT_CONFIGS))
@pytest.mark.parametrize("head", ["lm", "classifier"])
def test_evaluate_reports_what_the_adapter_trains_as_peft_counts_it(method, head, tmp_path, tiny_hf_dir,
                                                                   tiny_hf_classifier_dir):
    """An adapter written by peft, loaded as `gpt2lite evaluate` loads it: its trainable parameters are
    peft's count (the adapter, and a classifier's score head copy), not every parameter of the model."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from gpt2lite.experiment.report import method_row

    base = tiny_hf_dir if head == "lm" else tiny_hf_classifier_dir
    cls = transformers.GPT2LMHeadModel if head == "lm" else transformers.GPT2ForSequenceClassification
    reference = peft.get_peft_model(cls.from_pretrained(base), PEFT_CONFIGS[method](peft, "CAUSAL_LM" if head == "lm"
                                                                                     else "SEQ_CLS"))
    reference.save_pretrained(str(tmp_path / "adapter"))
    trainable, total = reference.get_nb_trainable_parameters()
    loaded, _ = gpt2lite.experiment.outputs.load_for_inference(str(base), str(tmp_path / "adapter"), device="cpu")
    row = method_row("adapter", {}, loaded, {})
    assert (row["trainable_params"], row["total_params"]) == (trainable, total)
    assert 0 < row["trainable_pct"] < 1


def test_cli_evaluate_of_an_adapter_does_not_count_the_base_as_trainable(tmp_path, tiny_hf_dir):
    from gpt2lite import GPT2
    from gpt2lite.peft import apply, save_adapter

    adapted = apply(GPT2.from_pretrained(str(tiny_hf_dir)), {"name": "lora", "rank": 4})
    save_adapter(adapted, str(tmp_path / "adapter"), base_model_name_or_path=str(tiny_hf_dir))
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"document": f"story {i} " * 6, "summary": f"story {i}"}) + "\n"
                            for i in range(20)))
    row = run(["evaluate", "--adapter", str(tmp_path / "adapter"), "--data.train", str(data), "--data.input_column",
               "document", "--data.target_column", "summary", "--generation.max_new_tokens", "2",
               "--output_dir", str(tmp_path / "evaluation")])["rows"][0]
    assert row["trainable_params"] == 2 * 4 * (64 + 3 * 64) and row["trainable_pct"] < 1
