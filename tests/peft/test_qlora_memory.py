"""Quantize while loading: GPT2.from_pretrained(path, quantize="nf4") equals from_pretrained then quantize_nf4
(same codes, same logits) from single, sharded and .bin checkpoints, and its peak memory is about the 4-bit
model's, not the float model's (measured in a fresh process)."""

import json
import logging
import subprocess
import sys
import textwrap

import pytest
import torch

from gpt2lite import GPT2, GPT2ForSequenceClassification
from gpt2lite.errors import CheckpointError
from gpt2lite.quantization import quantize_nf4
from gpt2lite.quantization.linear import NF4Linear

from conftest import REPO_ROOT, hf_gpt2_config


def load_then_quantize(directory, cls=GPT2, dtype=None, compute_dtype=torch.float32, double_quant=True):
    model = cls.from_pretrained(str(directory), dtype=dtype)
    quantize_nf4(model, compute_dtype=compute_dtype, double_quant=double_quant)
    return model


def assert_same_model(loaded, reference):
    state, expected = loaded.state_dict(), reference.state_dict()
    assert state.keys() == expected.keys()
    for key in expected:
        assert state[key].dtype == expected[key].dtype and torch.equal(state[key], expected[key]), key
    assert loaded.lm_head.weight is loaded.transformer.wte.weight if hasattr(loaded, "lm_head") else True
    quantized = [name for name, m in loaded.named_modules() if isinstance(m, NF4Linear)]
    assert quantized == [name for name, m in reference.named_modules() if isinstance(m, NF4Linear)] and quantized
    for name in quantized:
        assert loaded.get_submodule(name).compute_dtype == reference.get_submodule(name).compute_dtype
    ids = torch.randint(0, 50257, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids), reference(ids))
    assert not loaded.training


@pytest.mark.parametrize("dtype,compute_dtype,double_quant", [
    (None, torch.float32, True), (None, "bfloat16", False), (torch.bfloat16, torch.bfloat16, True)])
def test_quantize_on_load_equals_load_then_quantize(tiny_hf_dir, dtype, compute_dtype, double_quant):
    loaded = GPT2.from_pretrained(str(tiny_hf_dir), dtype=dtype, quantize="nf4", compute_dtype=compute_dtype,
                                  double_quant=double_quant)
    expected_compute = torch.bfloat16 if compute_dtype == "bfloat16" else compute_dtype
    assert_same_model(loaded, load_then_quantize(tiny_hf_dir, dtype=dtype, compute_dtype=expected_compute,
                                                 double_quant=double_quant))


def test_from_a_sharded_safetensors_checkpoint(tmp_path, tiny_hf_dir):
    import transformers

    transformers.GPT2LMHeadModel.from_pretrained(str(tiny_hf_dir)).save_pretrained(str(tmp_path), max_shard_size="2MB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(set(json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"].values())) > 1
    assert_same_model(GPT2.from_pretrained(str(tmp_path), quantize="nf4"), load_then_quantize(tiny_hf_dir))


def test_from_a_bin_checkpoint_with_a_warning(tmp_path, tiny_hf_dir, caplog):
    import shutil

    from safetensors.torch import load_file

    shutil.copy(tiny_hf_dir / "config.json", tmp_path / "config.json")  # an older transformers' layout
    torch.save(load_file(str(tiny_hf_dir / "model.safetensors")), tmp_path / "pytorch_model.bin")
    with caplog.at_level(logging.WARNING, logger="gpt2lite.hub.quantized"):
        loaded = GPT2.from_pretrained(str(tmp_path), quantize="nf4")
    assert "reading the whole pytorch_model.bin" in caplog.text
    assert_same_model(loaded, load_then_quantize(tiny_hf_dir))


def test_a_classifier_with_its_head_and_with_a_new_one(tiny_hf_classifier_dir, tiny_hf_dir):
    loaded = GPT2ForSequenceClassification.from_pretrained(str(tiny_hf_classifier_dir), quantize="nf4")
    reference = load_then_quantize(tiny_hf_classifier_dir, GPT2ForSequenceClassification)
    assert loaded.num_labels == reference.num_labels == 20
    assert_same_model(loaded, reference)
    torch.manual_seed(0)
    fresh = GPT2ForSequenceClassification.from_pretrained(str(tiny_hf_dir), quantize="nf4", num_labels=3)
    assert fresh.score.weight.shape == (3, 64) and not fresh.score.weight.is_meta
    assert fresh.config.pad_token_id == 50256  # as the float path sets it for a new head


def test_bad_options_get_clear_errors(tiny_hf_dir, tmp_path):
    with pytest.raises(ValueError, match="quantize must be one of"):
        GPT2.from_pretrained(str(tiny_hf_dir), quantize="int8")
    with pytest.raises(ValueError, match="dtype must be one of"):
        GPT2.from_pretrained(str(tiny_hf_dir), quantize="nf4", compute_dtype="int8")
    with pytest.raises(TypeError, match="options of quantize='nf4'"):
        GPT2.from_pretrained(str(tiny_hf_dir), compute_dtype=torch.bfloat16)
    import transformers

    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(hf_gpt2_config(n_layer=1)).save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_layer": 2}))
    with pytest.raises(CheckpointError, match="missing"):
        GPT2.from_pretrained(str(tmp_path), quantize="nf4")


PEAK_RSS_SCRIPT = textwrap.dedent("""
    import resource, sys
    import gpt2lite
    from gpt2lite.quantization import quantize_nf4

    def resident():  # bytes resident now
        return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()

    def peak_resident():  # VmHWM: unlike ru_maxrss, not inherited from the parent (pytest) at fork
        line = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024

    before = resident()
    if sys.argv[2] == "on_load":
        model = gpt2lite.GPT2.from_pretrained(sys.argv[1], quantize="nf4")
    elif sys.argv[2] == "float":
        model = gpt2lite.GPT2.from_pretrained(sys.argv[1])
    else:
        model = quantize_nf4(gpt2lite.GPT2.from_pretrained(sys.argv[1])) and None
    print(peak_resident() - before)
""")


def peak_rss_of_loading(directory, how: str) -> int:
    """Peak resident bytes a fresh process adds while loading gpt2 in 4 bits, beyond its imports."""
    done = subprocess.run([sys.executable, "-c", PEAK_RSS_SCRIPT, str(directory), how], capture_output=True,
                          text=True, env={"PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "PATH": ""},
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return int(done.stdout.split()[-1])


def test_loading_gpt2_in_4_bits_peaks_at_about_the_4bit_model(gpt2_124m_hf):
    directory, _ = gpt2_124m_hf
    model = GPT2.from_pretrained(str(directory), quantize="nf4")
    model_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])  # ~202 MB
    largest_layer = 4 * 768 * 3072  # mlp.c_fc in float32, 9.4 MB
    float_checkpoint = (directory / "model.safetensors").stat().st_size  # ~500 MB
    on_load = peak_rss_of_loading(directory, "on_load")
    assert on_load < model_bytes + 8 * largest_layer, (on_load, model_bytes)
    assert on_load < 0.6 * float_checkpoint
    # loading the float model first, as before, costs at least the float checkpoint
    assert peak_rss_of_loading(directory, "after_load") > float_checkpoint


def test_loading_in_float_peaks_at_about_the_model(gpt2_124m_hf):
    """The float loader reads a tensor at a time too: GPT-2's transposed Conv1D weights are copied one by one,
    so the source file's tensors and their transposed copies are never all held at once (gpt2-xl: 6.15 GB
    peak for its 6.2 GB of weights, against 11.85 GB when the whole file was read first)."""
    directory, _ = gpt2_124m_hf
    float_checkpoint = (directory / "model.safetensors").stat().st_size  # ~500 MB
    # measured: 436 MB, and 761 MB when the whole file was read before the transposed copies were made
    assert peak_rss_of_loading(directory, "float") < 1.2 * float_checkpoint
