"""The fault catalogue: each bad input or fault gets the right exception, a message that names the culprit
(file, key, row, value), and leaves nothing changed or lost (weights, the previous checkpoint, the files).

The error contract: checkpoints and model directories raise CheckpointError naming the file; data raises
DataError naming the file or row; bad arguments and inputs raise ValueError or TypeError naming the value.
"""

import errno
import json
import os
import re
import shutil
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from gpt2lite import GPT2, GPT2Config, Tokenizer
from gpt2lite.training.checkpoint import load_checkpoint
from gpt2lite.errors import CheckpointError
from gpt2lite.files import atomic_write
from gpt2lite.kernels.loss import lm_loss as causal_lm_loss
from gpt2lite.loss import IGNORE_INDEX
from gpt2lite.tasks import DataError, build_classification, load_table, tokenize_stream
from gpt2lite.training.loop import train
from train_helpers import VOCAB, collate_lm, lm_examples, resume_config, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def weights(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_unchanged(model, before):
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


def run_config(output_dir, **overrides):
    """A short run: 4 steps, no evaluation, a checkpoint every 2 steps."""
    return resume_config(output_dir, **{**dict(max_steps=4, eval_every=None, save_every=2), **overrides})


# ------------------------------------------------------------------------------------------ losses and labels


class CountingHead(nn.Module):
    """An LM head (takes the autograd path) that counts its calls."""

    def __init__(self, linear):
        super().__init__()
        self.linear, self.out_features, self.calls = linear, linear.out_features, 0

    def forward(self, x):
        self.calls += 1
        return self.linear(x)


@pytest.mark.parametrize("bad", [-1, -99, -101, -10_000, 10, 11])
@pytest.mark.parametrize("counting", [False, True])
def test_a_label_that_is_no_token_id_nor_ignored_is_refused_before_any_work(bad, counting):
    """Labels of -1 used to index the last vocabulary row: a wrong loss, silently."""
    linear = nn.Linear(8, 10, bias=False)
    head = CountingHead(linear) if counting else linear
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    labels = torch.tensor([[0, 1, IGNORE_INDEX, 3, 4], [5, 6, 7, bad, IGNORE_INDEX]])
    with pytest.raises(ValueError, match=rf"label {bad} at row 1, position 3 is not a token id in \[0, 10\) nor -100"):
        causal_lm_loss(hidden, labels, head)
    assert not counting or head.calls == 0
    # -100 is the one negative label allowed, and a label in the unused first position is never read
    labels[1, 3], labels[0, 0] = IGNORE_INDEX, -1
    assert torch.isfinite(causal_lm_loss(hidden, labels, head))


def test_training_with_a_label_of_minus_one_stops_before_the_first_update(tmp_path):
    model = tiny_model(0)
    before = weights(model)
    rows = lm_examples(4)
    rows[0] = {**rows[0], "labels": [-1] * 3 + rows[0]["labels"][3:]}  # in the first step's batch
    with pytest.raises(ValueError, match="label -1 at row 0, position 1"):
        train(model, rows, run_config(tmp_path, batch_size=1, grad_accum=1, shuffle=False), collate_fn=collate_lm)
    assert_unchanged(model, before)
    assert not (tmp_path / "checkpoint.pt").exists()


@pytest.mark.parametrize("which", ["training", "evaluation"])
def test_a_dataset_without_any_label_token_is_refused_before_the_first_step(tmp_path, which):
    """All labels -100 used to 'train' with a loss of 0 and unchanged weights."""
    unlabelled = [{**row, "labels": [IGNORE_INDEX] * len(row["labels"])} for row in lm_examples(6)]
    data, eval_data = (unlabelled, None) if which == "training" else (lm_examples(6), unlabelled)
    model = tiny_model(0)
    before = weights(model)
    with pytest.raises(ValueError, match=f"the {which} set has no label tokens: every label of its 6 examples is -100"):
        train(model, data, run_config(tmp_path), eval_dataset=eval_data, collate_fn=collate_lm)
    assert_unchanged(model, before)
    assert not (tmp_path / "log.jsonl").exists()
    # one labelled token anywhere is enough
    unlabelled[5]["labels"][3] = unlabelled[5]["input_ids"][3]
    assert train(tiny_model(0), unlabelled, run_config(tmp_path, max_steps=1), collate_fn=collate_lm)["steps"] == 1


# ------------------------------------------------------------------------------------------ inputs


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.uint8, torch.float32, torch.bool])
def test_input_ids_of_a_narrow_or_non_integer_dtype_are_refused(dtype):
    """int8 wraps ids above 127 and uint8 cannot hold ids above 255: refused, naming the dtype."""
    model = GPT2(GPT2Config.from_name("tiny")).eval()
    with pytest.raises(TypeError, match=rf"must be an integer tensor of dtype torch.long .*got {dtype}.*use torch.long"):
        model(torch.tensor([[1, 2, 3]]).to(dtype))
    ids = torch.tensor([[1, 300, 50256]])
    assert torch.equal(model(ids.int()), model(ids))  # int32 holds every id: accepted, the same logits


# ------------------------------------------------------------------------------------------ model checkpoints


@pytest.fixture
def hf_copy(tiny_hf_dir, tmp_path):
    return shutil.copytree(tiny_hf_dir, tmp_path / "checkpoint")


def edit_config(directory, config):
    (directory / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("change, culprit", [
    ({"n_head": 5}, r"n_embd \(64\) must be divisible by n_head \(5\)"),
    ({"n_layer": "2"}, "n_layer must be a positive integer, got '2'"),
    ({"n_embd": 64.5}, "n_embd must be a positive integer, got 64.5"),
])
def test_bad_config_values_are_checkpoint_errors_naming_config_json(hf_copy, change, culprit):
    edit_config(hf_copy, {**json.loads((hf_copy / "config.json").read_text()), **change})
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(hf_copy / 'config.json'))}: GPT2Config: {culprit}"):
        GPT2.from_pretrained(str(hf_copy))


def test_a_config_that_is_not_a_json_object(hf_copy):
    edit_config(hf_copy, [json.loads((hf_copy / "config.json").read_text())])
    with pytest.raises(CheckpointError, match=r"config.json holds a JSON list, expected an object of config fields"):
        GPT2.from_pretrained(str(hf_copy))


@pytest.mark.parametrize("index, culprit", [("{not json", "is not valid JSON"), ("{}", "has no weight_map"),
                                            ('{"weight_map": ["a"]}', "has no weight_map")])
def test_a_broken_shard_index_names_the_index_file(tiny_hf_dir, tmp_path, index, culprit):
    (tmp_path / "config.json").write_text((tiny_hf_dir / "config.json").read_text())
    (tmp_path / "model.safetensors.index.json").write_text(index)
    with pytest.raises(CheckpointError, match=rf"model.safetensors.index.json {culprit}"):
        GPT2.from_pretrained(str(tmp_path))


def test_an_integer_weight_is_refused_naming_the_key(hf_copy):
    from safetensors.torch import load_file, save_file

    state = load_file(hf_copy / "model.safetensors")
    state["transformer.h.0.ln_1.weight"] = state["transformer.h.0.ln_1.weight"].long()
    save_file(state, hf_copy / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"transformer.h.0.ln_1.weight in .* holds torch.int64 values, not "
                                              "floating-point weights"):
        GPT2.from_pretrained(str(hf_copy))


# ------------------------------------------------------------------------------------------ training checkpoints


@pytest.fixture
def finished_run(tmp_path):
    """(output_dir, checkpoint bytes, weights) of a finished 4-step run."""
    model = tiny_model(0, dropout=0.1)
    train(model, lm_examples(6), run_config(tmp_path / "run"), collate_fn=collate_lm)
    return tmp_path / "run", (tmp_path / "run" / "checkpoint.pt").read_bytes(), weights(model)


def test_checkpoint_pt_holds_only_tensors_and_plain_containers(finished_run):
    directory, _, _ = finished_run
    state = torch.load(directory / "checkpoint.pt", weights_only=True)  # no pickled object in it
    assert state["state"]["step"] == 4 and isinstance(state["rng"][0]["numpy"][1], torch.Tensor)


class Payload:
    """Creates a file when unpickled: what a malicious checkpoint.pt could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_checkpoint_holding_a_pickled_object_is_refused_without_running_it(finished_run, tmp_path):
    directory, _, _ = finished_run
    state = torch.load(directory / "checkpoint.pt", weights_only=True)
    marker = tmp_path / "code_ran"
    torch.save({**state, "state": {**state["state"], "note": Payload(marker)}}, tmp_path / "shared.pt")
    model = tiny_model(5)
    before = weights(model)
    with pytest.raises(CheckpointError, match=r"shared.pt holds a Python object that is not a tensor or a plain "
                                              r"container \(_?io.open\); refused, because loading it could run code"):
        train(model, lm_examples(6), run_config(tmp_path / "resumed", resume_from=str(tmp_path / "shared.pt")),
              collate_fn=collate_lm)
    assert not marker.exists()
    assert_unchanged(model, before)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_truncated_or_corrupt_checkpoint_pt_is_a_checkpoint_error(finished_run, tmp_path, damage):
    directory, data, _ = finished_run
    damaged = {"truncated": data[: len(data) // 2], "garbage": b"\x80\x02garbage" * 50, "empty": b""}[damage]
    (tmp_path / "damaged.pt").write_bytes(damaged)
    model = tiny_model(5)
    before = weights(model)
    with pytest.raises(CheckpointError, match=r"could not read .*damaged.pt \(\w+\): the file is truncated or corrupted"):
        train(model, lm_examples(6), run_config(tmp_path / "resumed", resume_from=str(tmp_path / "damaged.pt")),
              collate_fn=collate_lm)
    assert_unchanged(model, before)


def save_that_fills_the_disk(real_save, error):
    """torch.save that writes part of the file, then fails as a full disk does."""
    def save(obj, path, *args, **kwargs):
        real_save(obj, path, *args, **kwargs)
        with open(path, "r+b") as f:
            f.truncate(100)
        raise error
    return save


@pytest.mark.parametrize("how", ["ENOSPC", "torch's own words"])
def test_a_full_disk_while_saving_says_so_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, how):
    """The run saves at step 2, then the disk fills before the save at step 4."""
    import gpt2lite.files

    error = OSError(errno.ENOSPC, "No space left on device") if how == "ENOSPC" else RuntimeError(
        "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    def fill_disk_after_step_3(record):
        if record["step"] == 3:
            monkeypatch.setattr(torch, "save", save_that_fills_the_disk(torch.save, error))
            if how != "ENOSPC":  # only the free space tells it apart from another failure
                monkeypatch.setattr(gpt2lite.files.shutil, "disk_usage", lambda path: SimpleNamespace(free=0))

    with pytest.raises(OSError, match=rf"the disk is full \(no space left on the device\) while writing "
                                      rf"{re.escape(str(tmp_path / 'checkpoint.pt'))}; the previous file is "
                                      "unchanged. Free some space") as excinfo:
        train(tiny_model(0), lm_examples(10), run_config(tmp_path), collate_fn=collate_lm, on_log=fill_disk_after_step_3)
    assert excinfo.value.errno == errno.ENOSPC and excinfo.value.filename == str(tmp_path / "checkpoint.pt")
    monkeypatch.undo()
    assert load_checkpoint(str(tmp_path / "checkpoint.pt"))["state"]["step"] == 2
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


def test_stale_temporaries_of_a_killed_save_are_removed_on_the_next_save_or_resume(finished_run):
    directory, data, _ = finished_run
    stale = directory / ".checkpoint.pt.k1lled_x.tmp"
    other_target = directory / ".best.safetensors.k1lled_x.tmp"
    unrelated = directory / ".checkpoint.pt.notes.tmp"
    for path in (stale, other_target, unrelated):
        path.write_bytes(b"half a file")
    # resuming (here a finished run: nothing is trained or saved) removes the checkpoint's temporaries
    train(tiny_model(5), lm_examples(6), run_config(directory, resume_from=str(directory / "checkpoint.pt")),
          collate_fn=collate_lm)
    assert not stale.exists() and other_target.exists() and unrelated.exists()
    assert (directory / "checkpoint.pt").read_bytes() == data
    # saving a file removes its own temporaries, not another file's
    atomic_write(str(directory / "best.safetensors"), lambda tmp: open(tmp, "w").close())
    assert not other_target.exists() and unrelated.exists()


# ------------------------------------------------------------------------------------------ data files


@pytest.fixture
def no_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets_cache"))


@pytest.mark.parametrize("name, text, line", [("news.csv", "text,label\nok,1\ncaf\xe9 au lait,0\n", 3),
                                              ("news.tsv", "text\tlabel\nok\t1\ncaf\xe9 au lait\t0\n", 3),
                                              ("news.jsonl", '{"text": "ok"}\n{"text": "caf\xe9 au lait"}\n', 2),
                                              ("news.txt", "ok\ncaf\xe9 au lait\n", 2)])
def test_a_file_that_is_not_utf8_is_named_with_the_line(tmp_path, no_cache, name, text, line):
    path = tmp_path / name
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(DataError, match=rf"'{re.escape(str(path))}' is not UTF-8 text: byte \d+ \(line {line}\) "
                                        r"is b'\\xe9'. Save it as UTF-8"):
        load_table(data_files=str(path))


@pytest.mark.parametrize("name", ["empty.csv", "empty.tsv", "empty.txt"])
def test_an_empty_file_is_named(tmp_path, no_cache, name):
    (tmp_path / name).write_bytes(b"")
    with pytest.raises(DataError, match=rf"'{re.escape(str(tmp_path / name))}' is empty \(0 bytes\)"):
        load_table(data_files=str(tmp_path / name))


@pytest.mark.parametrize("cell, culprit", [("", "row 2: the label is empty"),
                                           ("bullish", "row 2: label 'bullish' is not an integer class id")])
def test_a_bad_label_cell_in_a_csv_names_its_row(tmp_path, no_cache, cell, culprit):
    """One bad cell retypes the whole CSV column (floats with a NaN, or strings): the error used to name row 0."""
    path = tmp_path / "labels.csv"
    path.write_text(f"text,label\nstocks up,1\nbonds down,0\nweird,{cell}\nflat,1\n")
    with pytest.raises(DataError, match=culprit):
        build_classification(load_table(data_files=str(path)), Tokenizer())
    path.write_text("text,label\nstocks up,1\nbonds down,0\nflat,1\n")  # the same file with integers loads
    assert [row["labels"] for row in build_classification(load_table(data_files=str(path)), Tokenizer()).rows] == [1, 0, 1]


@pytest.mark.parametrize("value", [5, None, ["a list"]])
def test_a_language_modelling_text_that_is_not_a_string_is_an_error_not_a_silent_drop(value):
    with pytest.raises(DataError, match=rf"row 1 of the text is .* of type {type(value).__name__}, not a string"):
        tokenize_stream(["first text", value, "third"], Tokenizer())


# ------------------------------------------------------------------------------------------ NaN steps


class InfiniteFrom(nn.Module):
    """The wrapped model, whose loss is infinite from the n-th forward call on."""

    def __init__(self, model, first_bad_call):
        super().__init__()
        self.model, self.first_bad_call, self.calls = model, first_bad_call, 0

    def forward(self, **batch):
        self.calls += 1
        loss = self.model(**batch)
        return loss * float("inf") if self.calls >= self.first_bad_call else loss


def test_skipped_nan_steps_do_not_pass_an_old_loss_off_as_the_final_one(tmp_path):
    model = InfiniteFrom(tiny_model(0), first_bad_call=3)
    summary = train(model, lm_examples(8), run_config(tmp_path, batch_size=1, grad_accum=1, nan_policy="skip",
                                                      save_every=None), collate_fn=collate_lm)
    assert summary["steps"] == 4 and summary["skipped_steps"] == 2
    assert summary["final_train_loss_step"] == 2
    assert summary["final_train_loss"] == summary["history"]["train"][1][1]
    assert json.loads((tmp_path / "summary.json").read_text())["final_train_loss_step"] == 2
