"""The offline demo's pretrained base (gpt2lite/experiment/pretrain.py): it learns, it is cached and reused, any change
to its corpus or settings retrains it, a crash never leaves a broken cache, and its corpus holds none of the
summarization task's evaluation examples."""

import json
import os

import pytest
import torch

import gpt2lite.experiment.pretrain as pretrain_module
from gpt2lite.experiment.pretrain import PretrainConfig, cache_root, load_or_pretrain

WORDS = ["value", "list", "string", "file", "path", "number", "name", "object", "key", "item"]
TEXTS = [f"def get_{a}_{b}(self, {a}):\nReturn the {b} of the {a}.\n\nThe {a} must be a {b}; a missing {a} "
         f"raises KeyError." for a in WORDS for b in WORDS]  # ~3,000 tokens of a small, learnable language


def tiny(**changes):
    return PretrainConfig(**{"preset": "tiny", "steps": 3, "batch_size": 2, "warmup_steps": 1, **changes})


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2LITE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "offline-base"


def test_pretraining_lowers_the_held_out_loss(cache):
    _, metadata = load_or_pretrain(tiny(steps=25, lr=1e-2, heldout_fraction=0.1), texts=TEXTS)
    # the held-out tail (never trained on) is scored with the full 50,257-way softmax, after the rows of
    # tokens the corpus lacks were filled
    assert metadata["heldout_loss_at_init"] > 10.5  # ~ln(50257): chance
    assert metadata["heldout_loss_full_vocab"] < metadata["heldout_loss_at_init"] - 3.0
    assert metadata["heldout_loss_corpus_vocab"] < 2.0
    assert metadata["train_losses"][-1] < metadata["train_losses"][0] / 2  # from ~ln(corpus vocabulary)
    assert metadata["corpus_vocab_size"] < 200


def test_untrained_rows_take_the_rarest_trained_rows_mean():
    from gpt2lite import GPT2, GPT2Config
    from gpt2lite.experiment.pretrain import fill_untrained_rows

    model = GPT2(GPT2Config.from_name("tiny"))
    before = model.transformer.wte.weight.detach().clone()
    vocab, counts = torch.tensor([3, 7, 11, 50256]), torch.tensor([5, 1, 9, 2])
    fill_untrained_rows(model, vocab, counts, rarest=2)
    after = model.lm_head.weight.detach()  # tied: the head's rows are the embedding's
    assert torch.equal(after[vocab], before[vocab])
    expected = (before[7] + before[50256]) / 2  # the two rarest corpus tokens
    assert torch.allclose(after[0], expected) and torch.allclose(after[50255], expected)


def test_the_cache_is_reused_without_training(cache, monkeypatch):
    model, metadata = load_or_pretrain(tiny(), texts=TEXTS)
    assert metadata["from_cache"] is False and os.path.dirname(metadata["directory"]) == str(cache)
    stored = json.load(open(os.path.join(metadata["directory"], "metadata.json")))
    assert stored["key"] == os.path.basename(metadata["directory"]) and stored["corpus_sha256"]
    assert stored["settings"]["steps"] == 3 and stored["model_config"]["n_embd"] == 64

    def no_training(*args, **kwargs):
        raise AssertionError("a cached model was pretrained again")

    monkeypatch.setattr(pretrain_module, "pretrain", no_training)
    again, metadata_again = load_or_pretrain(tiny(), texts=TEXTS)
    assert metadata_again["from_cache"] is True and metadata_again["directory"] == metadata["directory"]
    reference = weights(model)
    assert all(torch.equal(reference[k], v) for k, v in again.state_dict().items())


@pytest.mark.parametrize("change", ["settings", "corpus", "config"])
def test_a_changed_corpus_config_or_setting_trains_a_new_model(cache, monkeypatch, change):
    _, first = load_or_pretrain(tiny(), texts=TEXTS)
    if change == "settings":
        _, second = load_or_pretrain(tiny(lr=2e-3), texts=TEXTS)
    elif change == "corpus":
        _, second = load_or_pretrain(tiny(), texts=TEXTS[:-1])
    else:  # the same preset name, another architecture (e.g. an edited preset)
        from gpt2lite.model.config import PRESETS

        monkeypatch.setitem(PRESETS, "tiny", {**PRESETS["tiny"], "n_layer": 1})
        _, second = load_or_pretrain(tiny(), texts=TEXTS)
    assert second["from_cache"] is False and second["directory"] != first["directory"]
    assert sorted(os.listdir(cache)) == sorted(os.path.basename(m["directory"]) for m in (first, second))


def test_a_crash_while_writing_leaves_no_cache_entry(cache, monkeypatch):
    real_dump = json.dump

    def crash(*args, **kwargs):  # metadata.json is written last, after the weights
        raise KeyboardInterrupt("killed while writing the cache")

    monkeypatch.setattr(pretrain_module.json, "dump", crash)
    with pytest.raises(KeyboardInterrupt):
        load_or_pretrain(tiny(), texts=TEXTS)
    assert not cache.exists() or os.listdir(cache) == []  # no entry, and no temporary directory left
    monkeypatch.setattr(pretrain_module.json, "dump", real_dump)
    _, metadata = load_or_pretrain(tiny(), texts=TEXTS)
    assert metadata["from_cache"] is False and os.listdir(cache) == [os.path.basename(metadata["directory"])]


def test_an_incomplete_entry_is_retrained_and_replaced(cache):
    _, metadata = load_or_pretrain(tiny(), texts=TEXTS)
    os.remove(os.path.join(metadata["directory"], "model.safetensors"))  # e.g. deleted by hand
    model, again = load_or_pretrain(tiny(), texts=TEXTS)
    assert again["from_cache"] is False and os.path.exists(os.path.join(again["directory"], "model.safetensors"))
    assert load_or_pretrain(tiny(), texts=TEXTS)[1]["from_cache"] is True


def test_cache_root_honours_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("GPT2LITE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == str(tmp_path / "xdg" / "gpt2lite")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == str(tmp_path / "home" / ".cache" / "gpt2lite")
    monkeypatch.setenv("GPT2LITE_CACHE", str(tmp_path / "mine"))
    assert cache_root() == str(tmp_path / "mine")


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="steps"):
        PretrainConfig(steps=0)
    with pytest.raises(ValueError, match="heldout_fraction"):
        PretrainConfig(heldout_fraction=0.0)


@pytest.fixture(scope="module")
def stdlib_corpora():
    from gpt2lite.tasks.docstrings import docstring_corpus, pretraining_texts

    return pretraining_texts(), docstring_corpus(None)


def test_pretraining_corpus_holds_no_evaluation_example(stdlib_corpora):
    texts, summarization = stdlib_corpora
    first_lines = set()  # of each docstring: after the signature, if there is one
    for text in texts:
        lines = text.split("\n")
        first_lines.add(lines[0].strip())
        if len(lines) > 1 and text.startswith(("def ", "class ")):
            first_lines.add(lines[1].strip())
    held_out = summarization["validation"] + summarization["test"]
    assert len(held_out) > 300
    assert not [e["target"] for e in held_out if e["target"] in first_lines]  # no evaluation summary as a docstring
    joined = "\n".join(texts)
    docstrings = [e["target"] + "\n\n" + e["source"].split("\n", 1)[1][:200] for e in held_out]
    assert not [d for d in docstrings if d in joined]  # nor any evaluation docstring (summary, then body)
    # the training examples are there (as docstrings: summary line first), and comments too
    trained = [e for e in summarization["train"] if e["target"] in first_lines]
    assert len(trained) > 0.9 * len(summarization["train"])
    assert len(joined) > 2_000_000


def test_offline_fallback_pretrains_and_says_so(cache, monkeypatch):
    import gpt2lite.experiment as experiment
    from gpt2lite.experiment.report import OFFLINE_PRETRAINED_NOTE, method_row, to_markdown

    monkeypatch.setattr("gpt2lite.experiment.base_model.hub_reachable", lambda: False)
    monkeypatch.setattr("gpt2lite.tasks.docstrings.pretraining_texts", lambda **kwargs: TEXTS)  # a small corpus
    base = experiment.load_base_model("gpt2", fallback_pretrain=tiny(steps=2))
    assert base.kind == "offline-pretrained" and base.random_init is False
    assert "SMALL OFFLINE-PRETRAINED 'tiny' model, NOT GPT-2" in base.description
    assert "not GPT-2 results" in base.description and str(cache) in base.description
    row = method_row("none", {}, base.model, {"rougeL": 1.0}, base_kind=base.kind)
    assert row["quality_note"] == OFFLINE_PRETRAINED_NOTE
    assert "not GPT-2 results" in to_markdown([row], "summarization")
    # without fallback_pretrain the fallback stays a random model, marked as such
    assert experiment.load_base_model("gpt2").kind == "random"
