"""strategy="fsdp" (FSDP2) with 2 CPU processes (gloo) trains as one process on the combined batch and as DDP:
for full fine-tuning (with activation checkpointing), LoRA, QLoRA, a soft prompt and the last N layers, the
same losses over 4 steps and the same final weights; a SIGKILLed run resumes from its sharded checkpoint to
the uninterrupted run's weights, bit for bit; the consolidated export loads in transformers and peft with
the one-process model's logits; while sharded, each rank's 4-bit base is uint8 shards, never a float copy.

Two torchrun launches in all (tests/fsdp_train_worker.py): every case with DDP and FSDP in one process
group followed by the run that is killed, and its resumption."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fsdp_cases import CASES, case_config, case_model
from gpt2lite.errors import CheckpointError
from gpt2lite.training.loop import train
from train_helpers import collate_lm, lm_examples, tiny_model

WORKER = Path(__file__).resolve().parents[1] / "fsdp_train_worker.py"

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def torchrun(output_dir: Path, *args: str):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parents[1])}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
         str(output_dir), *args], env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    """The cases' directory; its "crashed" subdirectory holds the killed run."""
    output_dir = tmp_path_factory.mktemp("fsdp")
    result = torchrun(output_dir, "cases", str(output_dir / "crashed"))
    assert (output_dir / "cases_done").exists(), result.stderr[-3000:]
    assert result.returncode != 0 and "SIGKILL" in result.stderr  # rank 0 killed itself in the last run
    return output_dir


@pytest.fixture(scope="module")
def one_process_runs(tmp_path_factory):
    """method -> (trained model, summary) of the one-process run with the same global batch."""
    output_dir, runs = tmp_path_factory.mktemp("single"), {}
    for method in CASES:
        model = case_model(method)
        summary = train(model, lm_examples(8), case_config(output_dir / method, method, processes=1),
                        eval_dataset=lm_examples(3, seed=1), collate_fn=collate_lm)
        runs[method] = (model.eval(), summary)
    return runs


def losses(summary, kind="train"):
    return [loss for _, loss in summary["history"][kind]]


@pytest.mark.parametrize("method", list(CASES))
def test_fsdp_trains_as_one_process_and_as_ddp(method, two_process_runs, one_process_runs):
    model, single = one_process_runs[method]
    runs = {strategy: json.loads((two_process_runs / f"{method}-{strategy}" / "run_summary.json").read_text())
            for strategy in ("ddp", "fsdp")}
    assert runs["fsdp"]["world_size"] == 2 and runs["fsdp"]["steps"] == 4
    assert losses(runs["fsdp"]) == pytest.approx(losses(single), abs=2e-5)
    assert losses(runs["fsdp"]) == pytest.approx(losses(runs["ddp"]), abs=2e-6)
    assert losses(runs["fsdp"], "val") == pytest.approx(losses(single, "val"), abs=2e-5)
    # consolidated at the end: every rank holds the whole trained model, the one-process run's weights
    directory = two_process_runs / f"{method}-fsdp"
    rank0, rank1 = (torch.load(directory / f"trainable_rank{r}.pt") for r in (0, 1))
    expected = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    assert rank0.keys() == rank1.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(rank0[name], rank1[name]), name
        # sharded vs one-process gradient sums round differently; AdamW's division by sqrt(v) turns that into
        # weight differences of up to ~1e-4 after 4 steps (1.0001e-4 measured on an Intel Xeon, full method)
        assert (rank0[name] - tensor).abs().max() < 3e-4, name
    assert (directory / "checkpoint-shards" / "meta.pt").is_file() and not (directory / "checkpoint.pt").exists()


def test_fsdp_exports_load_in_transformers_and_peft(two_process_runs, one_process_runs, tmp_path):
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    ids = torch.tensor([[5, 9, 17, 33, 2, 70, 41]])
    full = GPT2LMHeadModel.from_pretrained(two_process_runs / "full-fsdp" / "hf").eval()
    with torch.no_grad():
        assert (full(ids).logits - one_process_runs["full"][0](ids)).abs().max() < 1e-4
    tiny_model(0).save_pretrained(tmp_path / "base")
    base = GPT2LMHeadModel.from_pretrained(tmp_path / "base")
    lora = PeftModel.from_pretrained(base, two_process_runs / "lora-fsdp" / "adapter").eval()
    with torch.no_grad():
        assert (lora(ids).logits - one_process_runs["lora"][0](ids)).abs().max() < 1e-4


def test_each_rank_holds_4bit_shards_and_no_float_copy(two_process_runs):
    for rank in (0, 1):
        report = json.loads((two_process_runs / "qlora-fsdp" / f"report_rank{rank}.json").read_text())
        assert report["gathered"] == {"weight_packed": "torch.uint8", "dtensor": False}  # all-gathered as uint8
        layers = {entry["layer"] for entry in report["sharded"]}
        assert len(layers) == 2 * 4  # 2 blocks x (c_attn, attn.c_proj, c_fc, mlp.c_proj)
        for entry in report["sharded"]:
            if entry["tensor"] in ("weight_packed", "absmax_codes", "absmax_scale"):
                assert entry["dtensor"] and entry["dtype"] == "torch.uint8", entry
                assert entry["local_numel"] <= -(-entry["numel"] // 2), entry  # this rank's half
            else:  # the bias (sharded), the 0-d offset and the lookup tables: no tensor of a weight's size
                assert entry["tensor"] in ("bias", "absmax_offset", "codebook", "absmax_levels"), entry
                assert entry["local_numel"] < entry["weight_numel"] // 8, entry


def test_qlora_loaded_shard_by_shard_holds_a_shard_plus_one_layer(two_process_runs):
    """fsdp_load.load_sharded: each rank holds its shards and at most one layer beyond them while loading,
    and the run trains exactly as the QLoRA run sharded after loading whole."""
    streamed = two_process_runs / "qlora-streamed"
    for rank in (0, 1):
        report = json.loads((streamed / f"report_rank{rank}.json").read_text())
        assert report["model_bytes"] < 0.55 * report["whole_4bit_model_bytes"]  # its half, + replicated tables
        assert report["peak_loading_bytes"] <= report["model_bytes"] + report["largest_layer_bytes"]
    summary = json.loads((streamed / "run_summary.json").read_text())
    assert summary["history"] == json.loads((two_process_runs / "qlora-fsdp" / "run_summary.json").read_text())["history"]
    after, expected = (torch.load(two_process_runs / d / "trainable_rank0.pt") for d in ("qlora-streamed", "qlora-fsdp"))
    assert after.keys() == expected.keys() and all(torch.equal(after[k], expected[k]) for k in expected)


def test_sigkilled_fsdp_run_resumes_exactly_from_its_shards(two_process_runs):
    crashed = two_process_runs / "crashed"  # killed at step 3, after the checkpoint of step 2
    meta = torch.load(crashed / "full-fsdp" / "checkpoint-shards" / "meta.pt", weights_only=True)
    assert meta["state"]["step"] == 2 and meta["world_size"] == 2
    # another world size is refused before anything is loaded
    with pytest.raises(CheckpointError, match="2-process run with 1 processes"):
        train(case_model("full"), lm_examples(8),
              case_config(two_process_runs / "one", "full", strategy="fsdp",
                          resume_from=str(crashed / "full-fsdp")),
              eval_dataset=lm_examples(3, seed=1), collate_fn=collate_lm)
    resumed = torchrun(crashed, "resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((crashed / "full-fsdp" / "run_summary.json").read_text())
    uninterrupted = json.loads((two_process_runs / "full-fsdp" / "run_summary.json").read_text())
    assert summary["history"] == uninterrupted["history"]
    after, expected = (torch.load(d / "full-fsdp" / "trainable_rank0.pt") for d in (crashed, two_process_runs))
    for name, tensor in expected.items():
        assert torch.equal(after[name], tensor), name
