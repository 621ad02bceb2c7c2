"""QLoRA runs read their base in 4 bits (quantize-on-load), never the float model first: the whole
`gpt2lite finetune --method.name qlora` process, imports included, peaks below the size of the float
gpt2-medium checkpoint it fine-tunes (measured in a fresh process); run_method (and so `compare` and the
recipes) reads a QLoRA run's copy of a float base again from its checkpoint in 4 bits."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import REPO_ROOT
from gpt2lite.experiment.base_model import copy_for_run, load_base_model
from gpt2lite.peft import MethodConfig
from gpt2lite.quantization import quantize_nf4

SAVE_MEDIUM = textwrap.dedent("""
    import sys, torch, transformers
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=24, n_head=16, n_embd=1024)  # gpt2-medium, 355M parameters
    transformers.GPT2LMHeadModel(config).save_pretrained(sys.argv[1])
""")

CLI_PEAK = textwrap.dedent("""
    import sys
    from gpt2lite.cli import main

    main(sys.argv[1:])
    line = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print("PEAK_BYTES", int(line.split()[1]) * 1024)  # the process's peak resident set, imports included
""")


def child_env():
    return {"PYTHONPATH": str(REPO_ROOT), "PATH": os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def gpt2_medium_dir(tmp_path_factory):
    """A random-init gpt2-medium written by transformers (in a child process: the test process stays small)."""
    directory = tmp_path_factory.mktemp("gpt2_medium_hf")
    done = subprocess.run([sys.executable, "-c", SAVE_MEDIUM, str(directory)], capture_output=True, text=True,
                          env=child_env(), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return directory


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the peak RSS from /proc")
def test_cli_qlora_run_peaks_below_the_float_model(gpt2_medium_dir, tmp_path):
    data = tmp_path / "topics.jsonl"
    data.write_text("".join(json.dumps({"text": f"headline number {i} about {'stocks' if i % 2 else 'rates'}",
                                        "label": i % 2}) + "\n" for i in range(12)))
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-c", CLI_PEAK, "finetune", "--model", str(gpt2_medium_dir), "--data.task",
         "classification", "--data.train", str(data), "--data.max_length", "16", "--method.name", "qlora",
         "--method.rank", "2", "--train.max_steps", "1", "--train.batch_size", "2", "--train.progress_bar", "false",
         "--train.save_best", "false", "--train.output_dir", str(out)],
        capture_output=True, text=True, env=child_env(), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    peak = int(done.stdout.split("PEAK_BYTES")[-1].split()[0])
    float_model = (gpt2_medium_dir / "model.safetensors").stat().st_size  # 1.42 GB
    # measured: 3.49 GB when the float model was loaded, copied and then quantized; about 1 GB now
    assert peak < float_model, (peak, float_model)
    row = json.loads((out / "report.json").read_text())["rows"][0]
    assert row["model_mb"] < 0.4 * float_model / 2**20  # the run's model held its linears in 4 bits
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(gpt2_medium_dir)


def test_a_qlora_runs_copy_of_a_float_base_is_read_again_in_4_bits(tiny_hf_dir, monkeypatch):
    """copy_for_run (run_method's copy of the base): for QLoRA, the 4-bit model read from base.source equals
    the deep copy quantized afterwards, the classifier's new random score head included; no float copy is made."""
    import copy

    import gpt2lite.experiment.base_model

    torch.manual_seed(0)
    base = load_base_model(str(tiny_hf_dir), num_labels=3)
    assert base.source == str(tiny_hf_dir)
    expected = copy.deepcopy(base.model)
    quantize_nf4(expected)
    qlora = MethodConfig(name="qlora", rank=4)

    def no_deepcopy(value, memo=None):
        raise AssertionError("a float copy of the base was made for a QLoRA run")

    monkeypatch.setattr(gpt2lite.experiment.base_model.copy, "deepcopy", no_deepcopy)
    model = copy_for_run(base, qlora)
    monkeypatch.undo()
    state, reference = model.state_dict(), expected.state_dict()
    assert state.keys() == reference.keys() and any(k.endswith("weight_packed") for k in state)
    for key, tensor in reference.items():
        assert torch.equal(state[key], tensor), key
    assert torch.equal(model.score.weight, base.model.score.weight)  # the same new head as the float base's
    assert not any(k.endswith("weight_packed") for k in base.model.state_dict())  # the base stays float
    # other methods (and a base with no checkpoint to read again) get a deep copy
    assert not any(k.endswith("weight_packed") for k in copy_for_run(base, MethodConfig(name="lora")).state_dict())
