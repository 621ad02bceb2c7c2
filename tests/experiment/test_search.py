"""Hyperparameter search (issue 23): a search killed with SIGKILL resumes to the uninterrupted result, two
workers share one SQLite study, the median pruner stops a clearly worse trial, Ctrl-C'd trials run again,
and a storage that cannot be opened is named. Tiny model, a few steps per trial, offline."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from gpt2lite.cli import run
from gpt2lite.experiment.search import SearchConfig, run_search, space_for

pytest.importorskip("optuna")

KILL_WORKER = Path(__file__).resolve().parents[1] / "search_kill_worker.py"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
WORDS = "shares rose after the company reported strong earnings while analysts expected slower growth".split()


pytestmark = pytest.mark.usefixtures("hub_offline")


def news(tmp_path) -> Path:
    """30 short {"document", "summary"} rows."""
    rows = [{"document": f"Story {i}: " + " ".join(WORDS[(i + j) % len(WORDS)] for j in range(16)),
             "summary": " ".join(WORDS[i % len(WORDS):][:4])} for i in range(30)]
    path = tmp_path / "news.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def search_command(model, data, output_dir, trials, *options):
    """A LoRA search of `trials` trials of 3 steps each, evaluated after every step."""
    return ["finetune", "--model", str(model), "--data.train", str(data), "--data.input_column", "document",
            "--data.target_column", "summary", "--train.output_dir", str(output_dir), "--search.trials", str(trials),
            "--search.train_samples", "8", "--train.max_steps", "3", "--train.eval_every", "1",
            "--train.batch_size", "4", "--train.progress_bar", "false", "--generation.max_new_tokens", "4",
            "--data.max_test_samples", "2", *options]


def subprocess_env(tmp_path):
    return {**os.environ, **OFFLINE, "HF_DATASETS_CACHE": str(tmp_path / "hf_datasets_cache"),
            "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}


def finished(result: dict) -> list:
    return [t for t in result["trials"] if t["state"] in ("COMPLETE", "PRUNED")]


def params_key(trial: dict) -> str:
    return json.dumps(trial["params"], sort_keys=True)


def test_a_search_killed_in_its_third_trial_resumes_to_the_uninterrupted_result(tmp_path, tiny_hf_dir, one_thread):
    data, out = news(tmp_path), tmp_path / "killed"
    command = search_command(tiny_hf_dir, data, out, 5, "--search.pruner", "none", "--search.heartbeat_s", "1")
    killed = subprocess.run([sys.executable, str(KILL_WORKER), *command], env=subprocess_env(tmp_path),
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    before = json.loads((out / "search.json").read_text())
    assert [(t["number"], t["state"]) for t in before["trials"]] == [(0, "COMPLETE"), (1, "COMPLETE")]
    assert json.loads((out / "trial_2" / "trial.json").read_text())["state"] == "RUNNING"  # killed mid-trial

    run(command)  # the same command again, straight away: trial 2 is found stale once its heartbeat is old
    after = json.loads((out / "search.json").read_text())
    assert len(finished(after)) == 5
    assert [(t["number"], t["value"]) for t in after["trials"][:2]] == [(t["number"], t["value"])
                                                                       for t in before["trials"]]
    interrupted = after["trials"][2]
    rerun = [t for t in after["trials"] if t["retry_of"] == 2]
    assert interrupted["state"] == "FAIL" and len(rerun) == 1 and rerun[0]["params"] == interrupted["params"]
    folder = json.loads((out / "trial_2" / "trial.json").read_text())
    assert folder["state"] == "FAIL" and "interrupted" in folder["note"]
    assert len(after["trials"]) == 6 and all((out / f"trial_{t['number']}" / "summary.json").exists()
                                              for t in finished(after))

    run(search_command(tiny_hf_dir, data, tmp_path / "uninterrupted", 5, "--search.pruner", "none"))
    expected = json.loads((tmp_path / "uninterrupted" / "search.json").read_text())
    values = {params_key(t): t["value"] for t in finished(after)}
    assert sorted(values) == sorted(params_key(t) for t in expected["trials"])  # the same 5 configurations
    for trial in expected["trials"]:
        assert values[params_key(trial)] == pytest.approx(trial["value"], rel=1e-6)
    assert after["best_params"] == expected["best_params"]
    assert after["best_value"] == pytest.approx(expected["best_value"], rel=1e-6)


def test_two_workers_on_one_sqlite_storage_share_six_trials(tmp_path, tiny_hf_dir):
    out = tmp_path / "shared"
    command = search_command(tiny_hf_dir, news(tmp_path), out, 6, "--train.max_steps", "4",
                             "--search.heartbeat_s", "5", "--search.retrain_best_model", "true")
    workers = [subprocess.Popen([sys.executable, "-m", "gpt2lite", *command], env=subprocess_env(tmp_path),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [worker.communicate(timeout=400)[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], "\n".join(o[-3000:] for o in outputs)

    found = json.loads((out / "search.json").read_text())
    assert [t["number"] for t in found["trials"]] == list(range(6)) and len(finished(found)) == 6
    ran = [set(int(n) for n in re.findall(r"Trial (\d+) (?:finished|pruned)", output)) for output in outputs]
    assert ran[0].isdisjoint(ran[1]) and ran[0] | ran[1] == set(range(6))  # each trial ran in one worker only
    pids = {t["worker"].rsplit(":", 1)[1] for t in found["trials"]}
    assert pids == {str(worker.pid) for worker in workers}  # both took part
    for trial in found["trials"]:
        folder = out / f"trial_{trial['number']}"
        assert json.loads((folder / "trial.json").read_text())["worker"] == trial["worker"]
        records = [json.loads(line) for line in open(folder / "log.jsonl")]
        evaluations = {str(r["step"]): r["val_loss"] for r in records if r["type"] == "eval"}
        assert trial["intermediate_values"] == pytest.approx(evaluations)  # each evaluation went to the pruner
    # the worker that finished the last trial retrained the best configuration; the other left it to that one
    assert sum("which writes the best model" in output for output in outputs) == 1
    report = json.loads((out / "report.json").read_text())
    assert [row["method"] for row in report["rows"]] == ["lora (best trial, retrained)"]
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == found["best_params"]["rank"]


def curve_objective(worse=()):
    """A fake training run: val loss 1/step, ten times that for the trial numbers in `worse`."""
    def objective(params, trial_dir, report):
        number = int(trial_dir.rsplit("_", 1)[1])
        for step in (1, 2, 3):
            loss = (10.0 if number in worse else 1.0) / step
            report(loss, step)
        return loss
    return objective


def test_the_median_pruner_stops_a_clearly_worse_trial_of_a_resumed_search(tmp_path):
    space = space_for("full")
    first = run_search(curve_objective(), 3, str(tmp_path / "median"), space=space)
    assert first["states"]["COMPLETE"] == 3
    resumed = run_search(curve_objective(worse={3}), 5, str(tmp_path / "median"), space=space)
    assert [t["state"] for t in resumed["trials"]] == ["COMPLETE"] * 3 + ["PRUNED", "COMPLETE"]
    assert resumed["trials"][3]["intermediate_values"] == {"1": 10.0}  # stopped at its first evaluation
    folder = json.loads((tmp_path / "median" / "trial_3" / "trial.json").read_text())
    assert folder["state"] == "PRUNED" and "pruned at step 1" in folder["note"]
    assert "| 3 | PRUNED |" in (tmp_path / "median" / "search.md").read_text()

    unpruned = run_search(curve_objective(worse={3}), 5, str(tmp_path / "none"), space=space, pruner="none")
    assert [t["state"] for t in unpruned["trials"]] == ["COMPLETE"] * 5


def test_a_trial_stopped_by_ctrl_c_runs_again_when_the_search_is_rerun(tmp_path):
    def interrupted_in_trial_1(params, trial_dir, report):
        if trial_dir.endswith("trial_1"):
            raise KeyboardInterrupt
        return params["lr"]

    with pytest.raises(KeyboardInterrupt):
        run_search(interrupted_in_trial_1, 3, str(tmp_path), space=space_for("full"))
    result = run_search(lambda params, trial_dir, report: params["lr"], 3, str(tmp_path), space=space_for("full"))
    assert [(t["number"], t["state"], t["retry_of"]) for t in result["trials"]] == [
        (0, "COMPLETE", None), (1, "FAIL", None), (2, "COMPLETE", 1), (3, "COMPLETE", None)]
    assert result["trials"][2]["params"] == result["trials"][1]["params"]
    assert "interrupted" in json.loads((tmp_path / "trial_1" / "trial.json").read_text())["note"]


@pytest.mark.parametrize("url, shown", [
    ("sqlite:////no/such/directory/search.db", "sqlite:////no/such/directory/search.db"),
    ("nosuchdb://host/study", "nosuchdb://host/study"),
    ("postgresql://user:s3cret@127.0.0.1:1/study", "postgresql://user:***@127.0.0.1:1/study"),
])
def test_a_storage_that_cannot_be_opened_is_named(tmp_path, url, shown):
    with pytest.raises(ValueError, match="cannot open the search storage") as error:
        run_search(curve_objective(), 1, str(tmp_path), storage=url)
    assert repr(shown) in str(error.value) and "s3cret" not in str(error.value)
    assert "--search.storage takes a SQLAlchemy database URL" in str(error.value)


def test_search_config_refuses_an_unknown_pruner_and_a_heartbeat_below_one_second():
    with pytest.raises(ValueError, match=r"search.pruner must be one of \('median', 'none'\), got 'hyperband'"):
        SearchConfig(trials=2, pruner="hyperband")
    with pytest.raises(ValueError, match="search.heartbeat_s must be >= 1"):
        SearchConfig(trials=2, heartbeat_s=0)


def test_slots_skip_interrupted_trials_that_were_rerun_and_surplus_trials():
    """The total a search counts: an interrupted trial's rerun holds its slot, a surplus trial holds none."""
    from types import SimpleNamespace

    from gpt2lite.experiment.search_study import slot_holders, slot_of

    def trial(number, retry_history=(), surplus=False):
        system_attrs = {"retry_history": list(retry_history), "failed_trial": retry_history[0]} if retry_history else {}
        return SimpleNamespace(number=number, system_attrs=system_attrs,
                               user_attrs={"surplus": True} if surplus else {})

    # of 4 slots: 2 interrupted, rerun as 4; 5 lost the race for the last slot; 4 interrupted too, rerun as 6
    trials = [trial(0), trial(1), trial(2), trial(3), trial(4, [2]), trial(5, surplus=True), trial(6, [2, 4])]
    assert [t.number for t in slot_holders(trials)] == [0, 1, 3, 6]
    assert [slot_of(trials, n) for n in (0, 1, 3, 7)] == [0, 1, 2, 4]
