"""Bad input gets a clear error that says what is wrong and how to fix it, not a deep traceback."""

import json
import random
import re
import shutil

import pytest
import torch
from conftest import hf_gpt2_config

from gpt2lite import GPT2, GPT2Config, GPT2ForSequenceClassification
from gpt2lite.errors import CheckpointError

transformers = pytest.importorskip("transformers")


def assert_short(excinfo):
    """The error does not chain the library-internal exception it replaced."""
    assert excinfo.value.__cause__ is None
    assert excinfo.value.__suppress_context__ or excinfo.value.__context__ is None


def copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_unknown_preset():
    with pytest.raises(ValueError, match=r"unknown preset 'gpt5'; choose one of .*'gpt2-medium'"):
        GPT2Config.from_name("gpt5")


def test_bad_config_values():
    with pytest.raises(ValueError, match=r"n_embd \(65\) must be divisible by n_head \(4\)"):
        GPT2Config.from_name("tiny", n_embd=65)


@pytest.mark.parametrize("hub_id", ["gpt2", "openai-community/gpt2-medium"])
def test_hub_id_while_offline_says_how_to_pass_a_local_path(monkeypatch, tmp_path, hub_id):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # nothing cached
    with pytest.raises(CheckpointError) as excinfo:
        GPT2.from_pretrained(hub_id)
    message = str(excinfo.value)
    assert f"could not get {hub_id!r} from the Hugging Face Hub (HF_HUB_OFFLINE is set)" in message
    assert "pass a local directory instead: GPT2.from_pretrained('/path/to/dir')" in message
    assert_short(excinfo)


@pytest.mark.parametrize("value,offline", [("1", True), ("true", True), ("YES", True), ("On", True), ("0", False),
                                           ("false", False), ("no", False), ("", False), ("2", False)])
def test_offline_switches_read_as_huggingface_hub_reads_them(monkeypatch, value, offline):
    """One reading of HF_HUB_OFFLINE / HF_DATASETS_OFFLINE / TRANSFORMERS_OFFLINE for the model bridge and the
    data loader, the same as huggingface_hub's (1, ON, YES, TRUE in any case): hub_reachable answers False
    without asking the network exactly when a switch is set."""
    from huggingface_hub.constants import ENV_VARS_TRUE_VALUES

    from gpt2lite.hub.pretrained import offline_switch
    from gpt2lite.hub.pretrained import hub_reachable

    assert (value.upper() in ENV_VARS_TRUE_VALUES) is offline  # huggingface_hub's own set agrees
    for switch in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(switch, raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", value)
    assert offline_switch() == ("HF_DATASETS_OFFLINE" if offline else None)
    assert offline_switch(("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")) is None  # model downloads ignore it
    if offline:
        assert hub_reachable(timeout=0.01) is False


def test_missing_directory_and_file_instead_of_directory(tiny_hf_dir):
    with pytest.raises(CheckpointError, match="no directory './no/such/dir'"):
        GPT2.from_pretrained("./no/such/dir")
    with pytest.raises(CheckpointError, match="is a file; pass the directory that holds config.json"):
        GPT2.from_pretrained(str(tiny_hf_dir / "config.json"))


def test_directory_without_weights(tiny_hf_dir, tmp_path):
    (tmp_path / "config.json").write_text((tiny_hf_dir / "config.json").read_text())
    with pytest.raises(CheckpointError, match="holds no weights: expected one of model.safetensors"):
        GPT2.from_pretrained(str(tmp_path))


def test_directory_without_config_or_with_broken_config(tiny_hf_dir, tmp_path):
    shutil.copy(tiny_hf_dir / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="has no config.json"):
        GPT2.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        GPT2.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("damage", ["truncated", "garbage", "garbage header"])
def test_truncated_or_corrupted_safetensors(tiny_hf_dir, tmp_path, damage):
    directory = copy_checkpoint(tiny_hf_dir, tmp_path / "ckpt")
    weights = directory / "model.safetensors"
    data = weights.read_bytes()
    if damage == "truncated":  # an interrupted download
        data = data[: len(data) // 2]
    elif damage == "garbage":
        data = random.Random(0).randbytes(len(data))
    else:
        data = b"\xff" * 64 + data[64:]
    weights.write_bytes(data)
    with pytest.raises(CheckpointError, match=r"model.safetensors: .*probably truncated or corrupted.*download or save it again"
                       ) as excinfo:
        GPT2.from_pretrained(str(directory))
    assert_short(excinfo)


def test_truncated_pytorch_model_bin(tiny_hf_dir, tmp_path):
    (tmp_path / "config.json").write_text((tiny_hf_dir / "config.json").read_text())
    torch.save(GPT2.from_pretrained(str(tiny_hf_dir)).state_dict(), tmp_path / "pytorch_model.bin")
    data = (tmp_path / "pytorch_model.bin").read_bytes()
    (tmp_path / "pytorch_model.bin").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="pytorch_model.bin: .*truncated or corrupted"):
        GPT2.from_pretrained(str(tmp_path))


def test_missing_shard(tiny_hf_dir, tmp_path):
    transformers.GPT2LMHeadModel.from_pretrained(str(tiny_hf_dir)).save_pretrained(str(tmp_path), max_shard_size="1MB")
    next(tmp_path.glob("model-00002-of-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match=r"names the shard model-00002-of-\d+.safetensors, which is missing"):
        GPT2.from_pretrained(str(tmp_path))


def _edit_config(directory, **changes):
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_checkpoint_of_the_wrong_size_names_key_and_both_shapes(tmp_path):
    """config.json says n_embd 64 but the weights are 32 wide."""
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(hf_gpt2_config(n_embd=32)).save_pretrained(str(tmp_path))
    _edit_config(tmp_path, n_embd=64)
    with pytest.raises(CheckpointError) as excinfo:
        GPT2.from_pretrained(str(tmp_path))
    message = str(excinfo.value)
    assert re.search(r"transformer\.\S+: the checkpoint has shape \(\d+(, \d+)*\), the model expects \(\d+(, \d+)*\)",
                     message), message
    assert "config.json and the weights disagree" in message
    # the first mismatch in module order is the token embedding
    assert "transformer.wte.weight: the checkpoint has shape (50257, 32), the model expects (50257, 64)" in message


@pytest.mark.parametrize("config_layers, word, key", [(3, "missing", "transformer.h.2.attn.c_attn.bias"),
                                                       (1, "unexpected", "transformer.h.1.attn.c_attn.bias")])
def test_layer_count_mismatch_names_the_keys(tiny_hf_dir, tmp_path, config_layers, word, key):
    directory = copy_checkpoint(tiny_hf_dir, tmp_path / "ckpt")
    _edit_config(directory, n_layer=config_layers)
    with pytest.raises(CheckpointError, match=rf"does not match GPT2\(gpt2, n_layer={config_layers}\)") as excinfo:
        GPT2.from_pretrained(str(directory))
    message = str(excinfo.value)
    listed = re.search(rf"{word} \[(.*?)\]", message).group(1)
    assert repr(key) in listed


def test_classifier_label_count_mismatch(tiny_hf_classifier_dir):
    with pytest.raises(CheckpointError, match="score head has 20 labels, num_labels=3 was asked for"):
        GPT2ForSequenceClassification.from_pretrained(str(tiny_hf_classifier_dir), num_labels=3)


def test_bad_dtype(tiny_hf_dir):
    with pytest.raises(ValueError, match="dtype must be one of"):
        GPT2.from_pretrained(str(tiny_hf_dir), dtype="int8")


def test_input_longer_than_the_context():
    with torch.device("meta"):  # the full 1024-token gpt2; the check runs before any computation
        model = GPT2(GPT2Config.from_name("gpt2"))
    too_long = torch.zeros(1, 1025, dtype=torch.long, device="meta")
    with pytest.raises(ValueError, match=r"input of 1025 tokens is longer than the model's context of 1024; truncate"):
        model(too_long)
    small = GPT2(GPT2Config.from_name("tiny", n_positions=8))
    with pytest.raises(ValueError, match="input of 9 tokens is longer than the model's context of 8"):
        small(torch.zeros(1, 9, dtype=torch.long))


def test_token_ids_outside_the_vocabulary():
    model = GPT2(GPT2Config.from_name("tiny"))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 50257\), got values in \[0, 50257\]"):
        model(torch.tensor([[0, 50257]]))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 50257\), got values in \[-1, 3\]"):
        model(torch.tensor([[-1, 3]]))
    with pytest.raises(TypeError, match="input_ids must be an integer tensor"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"attention_mask has shape \(1, 2\), expected \(1, 3\)"):
        model(torch.zeros(1, 3, dtype=torch.long), attention_mask=torch.ones(1, 2))


@pytest.mark.parametrize("name", ["./no/such/model", "/no/such/model", "no/such/model", "tests/no_such_model"])
def test_a_path_like_model_name_that_is_not_a_directory_says_so(name, monkeypatch):
    """load_base_model (the CLI's --model) says "no directory" for a path, even with a fallback allowed,
    instead of "the Hugging Face Hub is unreachable"."""
    from gpt2lite.experiment.base_model import load_base_model

    monkeypatch.chdir(__import__("conftest").REPO_ROOT)  # tests/ exists: "tests/no_such_model" is a path
    for allow_random_init in (False, True):
        with pytest.raises(CheckpointError, match=f"no directory {name!r}"):
            load_base_model(name, allow_random_init=allow_random_init)
