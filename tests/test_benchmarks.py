"""Smoke test of benchmarks/run.py: the whole harness on the tiny preset, one step per mode, in-process.

No timing is asserted (speed is measured, never tested). What is asserted: the JSON has every field the
table needs, and with one shared transformers checkpoint and dropout off both stacks compute the same
first-step loss in every mode (so they do the same work) and generate the same greedy tokens.
"""

import importlib
import json
import math
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        run = importlib.import_module("run")
        out = tmp_path_factory.mktemp("bench")
        run.main(["--preset", "tiny", "--steps", "1", "--warmup", "0", "--batch-size", "2",
                  "--lm-seq-len", "32", "--summarization-seq-len", "96", "--prompt-len", "16", "--new-tokens", "4",
                  "--generation-repeats", "1", "--matmul-size", "256", "--threads", "1", "--device", "cpu",
                  "--same-weights", "--no-dropout", "--in-process", "--out", str(out), "--name", "smoke"])
    finally:
        sys.path.remove(str(BENCHMARKS))
    assert (out / "smoke.md").read_text().count("| lm |") == 5
    return json.loads((out / "smoke.json").read_text())


def test_json_has_every_configuration_and_field(results):
    assert {"machine", "settings", "training", "generation", "matmul", "targets"} <= set(results)
    assert results["matmul"]["peak_flops"] > 0
    configurations = {(row["workload"], row["mode"]) for row in results["training"]}
    assert configurations == {(w, m) for w in ("lm", "summarization")
                              for m in ("full", "lora", "prompt", "last2", "qlora")}
    for row in results["training"]:
        stacks = ("gpt2lite",) if row["mode"] == "qlora" else ("gpt2lite", "reference")
        assert ("reference" in row) == (row["mode"] != "qlora")
        for stack in stacks:
            side = row[stack]
            for field in ("median_step_s", "peak_rss_bytes", "trainable_parameters", "model_flops_per_step"):
                assert isinstance(side[field], (int, float)) and 0 < side[field] < math.inf, (stack, field, side[field])
            # one step, no warm-up: one finite loss (a NaN fails every comparison)
            assert len(side["losses"]) == 1 and 0 < side["losses"][0] < math.inf, (stack, side["losses"])
            assert side["tokens_per_step"] == 2 * row["seq_len"]
            # the table's rates are the step's work over its median time, and the fraction of the matmul peak
            assert side["tokens_per_s"] == pytest.approx(side["tokens_per_step"] / side["median_step_s"])
            assert side["achieved_flops"] == pytest.approx(side["model_flops_per_step"] / side["median_step_s"])
            assert side["peak_fraction"] == pytest.approx(side["achieved_flops"] / results["matmul"]["peak_flops"])
        if row["mode"] != "qlora":
            assert row["speed_ratio"] > 0 and row["memory_ratio"] > 0
    assert {t["target"].split(" >=")[0].split(" <=")[0] for t in results["targets"]}


def test_both_stacks_compute_the_same_first_step_loss(results):
    for row in results["training"]:
        if row["mode"] == "qlora":
            continue  # no reference
        lite, reference = row["gpt2lite"]["losses"][0], row["reference"]["losses"][0]
        assert abs(lite - reference) <= 1e-5 * abs(reference), (row["workload"], row["mode"], lite, reference)


def test_both_stacks_train_the_same_number_of_parameters(results):
    for row in results["training"]:
        if row["mode"] != "qlora":
            assert row["gpt2lite"]["trainable_parameters"] == row["reference"]["trainable_parameters"], row["mode"]


def test_summarization_labels_only_the_summary(results):
    row = next(r for r in results["training"] if r["workload"] == "summarization")
    lm_row = next(r for r in results["training"] if r["workload"] == "lm")
    # every row keeps at least a quarter of its tokens for the article, which carries no label
    assert 0 < row["gpt2lite"]["labelled_tokens_per_step"] <= row["gpt2lite"]["tokens_per_step"] * 3 // 4
    assert lm_row["gpt2lite"]["labelled_tokens_per_step"] == 2 * (lm_row["seq_len"] - 1)


def test_greedy_generation_gives_the_same_tokens(results):
    generation = results["generation"]
    assert generation["same_tokens"] is True
    assert generation["gpt2lite"]["new_tokens"] == 2 * 4 and generation["speed_ratio"] > 0


def test_scaling_benchmark_runs_every_row_of_both_stacks(tmp_path):
    """benchmarks/scaling.py end to end on the tiny preset: every method of both stacks trains (no row is
    absent), with finite step times and peak RSS, and the quantize-on-load row is measured."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        scaling = importlib.import_module("scaling")
        scaling.main(["--presets", "tiny", "--modes", "lora,qlora+ckpt", "--stacks", "gpt2lite,reference",
                      "--steps", "1", "--warmup", "0", "--seq-len", "32", "--threads", "1", "--out", str(tmp_path),
                      "--name", "smoke"])
    finally:
        sys.path.remove(str(BENCHMARKS))
    rows = json.loads((tmp_path / "smoke.json").read_text())["rows"]
    trained = [row for row in rows if row["mode"] != "load nf4"]
    assert [row["mode"] for row in trained] == ["lora", "qlora+ckpt"]
    for row in trained:
        for stack in ("gpt2lite", "reference"):
            if stack == "reference" and row["mode"].startswith("qlora") and "absent" in row[stack]:
                assert "bitsandbytes" in row[stack]["absent"]  # the only reason a reference row may be absent
                continue
            assert "absent" not in row[stack] and "skipped" not in row[stack], (row["mode"], stack, row[stack])
    load = next(row for row in rows if row["mode"] == "load nf4")["gpt2lite"]
    assert 0 < load["model_bytes"] < load["peak_rss_bytes"]


def test_matmul_floor_counts_the_model_flops_of_the_step(monkeypatch):
    """floor.py's GEMMs are the step's model FLOPs as report.py counts them: all of them under full
    fine-tuning; under LoRA all but the input gradients below block 0's c_attn (its base and lora_A), which
    report.py counts and autograd never computes (the embeddings are frozen)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import floor
    import report

    n_layer, C, n_head, V, B, T, labelled, r = 12, 768, 12, 50257, 4, 256, 1020, 8
    shape = report.Shape(n_layer, C, 4 * C, V)
    for mode in ("full", "lora"):
        gemm_flops = sum(2 * m * k * n * batch * count
                         for _, (m, k, n), batch, count in floor.step_gemms(n_layer, C, n_head, V, B, T, labelled, mode, r))
        expected = report.training_flops(shape, mode, B, T, labelled, lora_rank=r)
        if mode == "lora":
            expected -= 2 * B * T * (3 * C * C + r * C)
        assert gemm_flops == expected, mode


def test_decode_bound_reads_the_weights_and_the_cache_once_per_step(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import floor

    bound = floor.decode_bound(n_layer=2, C=8, vocab=10, n_positions=16, B=1, prompt_len=4, new_tokens=3,
                               weight_bytes=4, bytes_per_s=1000.0, peak_flops=1e12)
    weights = (2 * 12 * 64 + 10 * 8 + 16 * 8) * 4
    caches = [2 * 2 * 1 * (4 + step) * 8 * 4 for step in (1, 2)]  # two decoding steps after the prefill
    assert bound["decode_s"] == pytest.approx(sum(weights + c for c in caches) / 1000.0)
    assert bound["last_step_bytes"] == weights + caches[-1]
