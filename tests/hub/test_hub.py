"""The online path, tested offline: a stand-in Hub on 127.0.0.1 (tests/hub_server.py) serves a tiny random GPT-2
repo "gpt2", a peft LoRA adapter "user/adapter" and a CNN/DailyMail-shaped dataset "cnn_dailymail" (config
3.0.0, parquet files); with HF_ENDPOINT pointed at it, gpt2lite's hub calls run end to end and give what
transformers and peft give for the same files.

huggingface_hub and datasets read HF_ENDPOINT and HF_HUB_OFFLINE when they are imported (and conftest sets
HF_HUB_OFFLINE=1 for this process), so every client runs in a subprocess with a clean environment: no
offline switches, no proxies unless the test sets one, HF_HOME in a temporary directory.
"""

import io
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT, hf_gpt2_config
from hub_server import HubServer, Repo

INPUT_IDS = [[464, 3290, 318, 257, 922, 1110, 13, 198], [50256, 40, 588, 284, 2193, 546, 340, 11]]
TRAIN_ROWS_PER_FILE = 30

# runs in the subprocess: argv[1] = output directory; writes the logits and the tables it got
CLIENT = r"""
import json, os, sys
import torch
from gpt2lite import GPT2
from gpt2lite.experiment.base_model import load_base_model
from gpt2lite.tasks.splits import DataConfig, load_splits
from gpt2lite.peft import load_adapter
from gpt2lite.hub.pretrained import hub_reachable
from gpt2lite.tasks.loading import load_table

out = sys.argv[1]
ids = torch.tensor(json.loads(sys.argv[2]))
result = {"reachable": hub_reachable()}
base = load_base_model("gpt2")
result["random_init"] = base.random_init
model = base.model.eval()
with torch.no_grad():
    torch.save(model(ids), os.path.join(out, "base_logits.pt"))
    adapted = load_adapter(GPT2.from_pretrained("gpt2"), "user/adapter").eval()
    torch.save(adapted(ids), os.path.join(out, "adapter_logits.pt"))
if sys.argv[3] == "data":
    splits = load_splits(DataConfig(dataset="cnn_dailymail", dataset_config="3.0.0"), allow_fallback=True)
    result["fallback"] = splits.fallback
    result["splits"] = {name: [dict(row) for row in getattr(splits, name)] for name in ("train", "validation", "test")}
    result["first_rows"] = [dict(row) for row in load_table("cnn_dailymail", "3.0.0", split="train", max_rows=7)]
with open(os.path.join(out, "result.json"), "w") as f:
    json.dump(result, f)
"""


def _parquet(rows) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer, row_group_size=10)
    return buffer.getvalue()


def _cnn_rows(split, start, count):
    return [{"article": f"{split} article {i}: the council met on Tuesday and voted to repair the old bridge.",
             "highlights": f"Council votes to repair bridge ({split} {i}).", "id": f"{split}-{i:04d}"}
            for i in range(start, start + count)]


def _files(directory) -> dict:
    return {name: (directory / name).read_bytes() for name in os.listdir(directory)}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(repos, expected): the three repos, and what transformers / peft compute from the same files."""
    import peft
    import transformers

    root = tmp_path_factory.mktemp("hub_repos")
    torch.manual_seed(0)
    hf_model = transformers.GPT2LMHeadModel(hf_gpt2_config()).eval()
    hf_model.save_pretrained(root / "gpt2")
    ids = torch.tensor(INPUT_IDS)
    with torch.no_grad():
        base_logits = hf_model(ids).logits
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(hf_model, lora).eval()
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:  # B starts at zero: make the adapter change the logits
                parameter.normal_(std=0.5)
        adapter_logits = peft_model(ids).logits
    peft_model.save_pretrained(root / "adapter")
    gpt2_files = _files(root / "gpt2")
    gpt2_files["flax_model.msgpack"] = b"\0" * 1000  # the real repo holds other frameworks' weights too
    readme = ("---\nconfigs:\n- config_name: 3.0.0\n  data_files:\n  - split: train\n    path: 3.0.0/train-*\n"
              "  - split: validation\n    path: 3.0.0/validation-*\n  - split: test\n    path: 3.0.0/test-*\n---\n"
              "# CNN/DailyMail, test stand-in\n")
    dataset_files = {
        "README.md": readme.encode(),
        "3.0.0/train-00000-of-00002.parquet": _parquet(_cnn_rows("train", 0, TRAIN_ROWS_PER_FILE)),
        "3.0.0/train-00001-of-00002.parquet": _parquet(_cnn_rows("train", TRAIN_ROWS_PER_FILE, TRAIN_ROWS_PER_FILE)),
        "3.0.0/validation-00000-of-00001.parquet": _parquet(_cnn_rows("validation", 0, 8)),
        "3.0.0/test-00000-of-00001.parquet": _parquet(_cnn_rows("test", 0, 6)),
    }
    repos = {("model", "openai-community/gpt2"): Repo(gpt2_files), ("model", "user/adapter"): Repo(_files(root / "adapter")),
             ("dataset", "abisee/cnn_dailymail"): Repo(dataset_files)}
    return repos, {"base": base_logits, "adapter": adapter_logits}


@pytest.fixture
def hub(served):
    with HubServer(served[0], aliases={"gpt2": "openai-community/gpt2"}, lifetime_s=300) as server:
        yield server


def client_env(tmp_path, endpoint, **extra):
    """This process's environment without the Hub's offline switches, endpoint or proxies, plus `extra`."""
    dropped = ("HF_", "TRANSFORMERS_", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")
    env = {key: value for key, value in os.environ.items() if not key.upper().startswith(dropped)}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1", NO_PROXY="127.0.0.1,localhost", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    env.update(extra)
    return env


def run_client(tmp_path, env, data: bool) -> dict:
    out = tmp_path / "client"
    out.mkdir(exist_ok=True)
    result = subprocess.run([sys.executable, "-c", CLIENT, str(out), json.dumps(INPUT_IDS), "data" if data else "-"],
                            env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    return {"result": json.loads((out / "result.json").read_text()),
            "base": torch.load(out / "base_logits.pt"), "adapter": torch.load(out / "adapter_logits.pt")}


def test_model_adapter_and_dataset_come_from_the_hub(hub, served, tmp_path):
    _, expected = served
    got = run_client(tmp_path, client_env(tmp_path, hub.endpoint), data=True)
    result = got["result"]
    assert result["reachable"] and not result["random_init"]
    # GPT2.from_pretrained("gpt2") and load_adapter(model, "user/adapter") give transformers' and peft's logits
    assert (got["base"] - expected["base"]).abs().max() < 1e-4
    assert (got["adapter"] - expected["adapter"]).abs().max() < 1e-4
    assert (expected["adapter"] - expected["base"]).abs().max() > 0.1  # the adapter matters
    assert sorted(hub.downloaded("openai-community/gpt2")) == ["config.json", "model.safetensors"]  # not the flax weights
    assert sorted(hub.downloaded("user/adapter")) == ["adapter_config.json", "adapter_model.safetensors"]
    # the summarization example's hub path: every split, every row, as the parquet files hold them
    assert result["fallback"] is False
    splits = result["splits"]
    assert splits["train"] == _cnn_rows("train", 0, 2 * TRAIN_ROWS_PER_FILE)
    assert splits["validation"] == _cnn_rows("validation", 0, 8)
    assert splits["test"] == _cnn_rows("test", 0, 6)
    assert result["first_rows"] == _cnn_rows("train", 0, 7)
    assert not any(proxied for *_, proxied in hub.requests)


def test_max_rows_streams_only_the_files_that_hold_the_rows(hub, tmp_path):
    """load_table(..., max_rows=n) must not download a whole dataset to keep its first n rows."""
    code = ("import json, sys; from gpt2lite.tasks.loading import load_table; "
            "print(json.dumps([dict(r) for r in load_table('cnn_dailymail', '3.0.0', split='train', max_rows=5)]))")
    result = subprocess.run([sys.executable, "-c", code], env=client_env(tmp_path, hub.endpoint),
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    assert json.loads(result.stdout.splitlines()[-1]) == _cnn_rows("train", 0, 5)
    downloaded = hub.downloaded("abisee/cnn_dailymail", "dataset")
    assert "3.0.0/train-00000-of-00002.parquet" in downloaded
    assert not any(name.startswith(("3.0.0/train-00001", "3.0.0/validation", "3.0.0/test")) for name in downloaded)


def test_the_hub_is_reached_through_the_proxy_that_http_proxy_names(hub, served, tmp_path):
    """Behind a proxy the hub's host may not be reachable directly (here: a name that does not resolve);
    the reachability check and the downloads must both go through HTTP(S)_PROXY."""
    env = client_env(tmp_path, "http://hub.invalid", HTTP_PROXY=hub.endpoint, HTTPS_PROXY=hub.endpoint, NO_PROXY="")
    got = run_client(tmp_path, env, data=False)
    assert got["result"]["reachable"] and not got["result"]["random_init"]
    assert (got["base"] - served[1]["base"]).abs().max() < 1e-4
    assert hub.requests and all(proxied for *_, proxied in hub.requests)


def test_an_unreachable_hub_is_reported_offline_quickly(tmp_path):
    with HubServer({}) as stopped:
        endpoint = stopped.endpoint  # a port that nothing listens on once the server is stopped
    code = ("import time; from gpt2lite.tasks.loading import hub_reachable; t = time.time(); "
            "print(hub_reachable(timeout=3.0), round(time.time() - t, 1))")
    result = subprocess.run([sys.executable, "-c", code], env=client_env(tmp_path, endpoint),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-4000:]
    reachable, seconds = result.stdout.split()
    assert reachable == "False" and float(seconds) < 3.0
