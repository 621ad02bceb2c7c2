"""Hyperparameter search with Optuna (an optional extra: pip install optuna, or gpt2lite[search]).

    result = run_search(objective, n_trials=8, output_dir="runs/search", space=space_for("lora"))
    # objective(params, trial_dir, report) -> validation loss; params holds lr, epochs (+ rank, alpha,
    # dropout for LoRA); report(val_loss, step) after each evaluation raises optuna.TrialPruned to stop early

The study lives in an Optuna storage (default sqlite:///<output_dir>/search.db; see search_study.py), so a
search survives its process: run it again and it resumes (finished trials kept, an interrupted one run
again, the total still n_trials), and several processes given the same storage and study name share its
trials. Files in output_dir, all written atomically:
    trial_<n>/            the trial's training run, and trial.json: its number, params, state (RUNNING,
                          COMPLETE, PRUNED, FAIL), value, duration_s, worker, and a note when pruned or interrupted
    search.json           every trial (params, value, state, duration_s, worker, retry_of, intermediate val
                          losses) and the best one; rewritten after each trial
    search.md             the same trials as a table
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Optional

from gpt2lite.files import atomic_write_text
from gpt2lite.experiment.search_study import (default_storage, heartbeat_grace_s, open_study, retry, retry_of,
                                              shown_url, slot_holders, slot_of)
from gpt2lite.seed import seed_everything

logger = logging.getLogger(__name__)

# name -> ("log" | "float", low, high) | ("int", low, high) | ("choice", [options])
DEFAULT_SPACE = {
    "lr": ("log", 1e-5, 3e-3),
    "rank": ("choice", [4, 8, 16, 32]),
    "alpha": ("choice", [8, 16, 32, 64]),
    "dropout": ("float", 0.0, 0.2),
    "epochs": ("int", 1, 3),
}
LORA_OPTIONS = ("rank", "alpha", "dropout")  # searched for LoRA and QLoRA only
PRUNERS = ("median", "none")


@dataclass(frozen=True)
class SearchConfig:
    """A hyperparameter search of each fine-tuning run (off when trials == 0)."""

    trials: int = 0  # Optuna TPE trials per method, each in <output>/<method>/trial_<n>/; 0: no search
    retrain_best_model: bool = False  # then train the best configuration again on the whole training split
    train_samples: Optional[int] = None  # examples each trial trains on (None: data.max_train_samples)
    storage: Optional[str] = None  # Optuna storage URL (SQLAlchemy); None: sqlite:///<output>/<method>/search.db
    study_name: Optional[str] = None  # None: "<method>:<task>:<model>"; workers sharing a study give the same
    pruner: str = "median"  # "median": stop a trial whose val loss is worse than the median's; "none"
    heartbeat_s: int = 30  # a running trial's heartbeat; one silent for 2 x this + 2 s is rerun

    def __post_init__(self):
        if self.trials < 0:
            raise ValueError(f"search.trials must be >= 0, got {self.trials}")
        if self.train_samples is not None and self.train_samples < 1:
            raise ValueError(f"search.train_samples must be None or >= 1, got {self.train_samples}")
        if self.pruner not in PRUNERS:
            raise ValueError(f"search.pruner must be one of {PRUNERS}, got {self.pruner!r}")
        if self.heartbeat_s < 1:
            raise ValueError(f"search.heartbeat_s must be >= 1 (seconds), got {self.heartbeat_s}")


def space_for(method_name: str) -> Dict[str, tuple]:
    """The search space of one method: lr and epochs, and LoRA's rank, alpha and dropout for (q)lora."""
    lora = method_name in ("lora", "qlora")
    return {name: spec for name, spec in DEFAULT_SPACE.items() if lora or name not in LORA_OPTIONS}


def require_optuna():
    try:
        import optuna
    except ImportError:
        raise ImportError("hyperparameter search needs Optuna, an optional extra: pip install optuna "
                          "(or pip install 'gpt2lite[search]')") from None
    return optuna


def suggest(trial, space: Dict[str, tuple]) -> dict:
    """One trial's parameters drawn from `space`."""
    params = {}
    for name, spec in space.items():
        kind = spec[0]
        if kind == "log":
            params[name] = trial.suggest_float(name, spec[1], spec[2], log=True)
        elif kind == "float":
            params[name] = trial.suggest_float(name, spec[1], spec[2])
        elif kind == "int":
            params[name] = trial.suggest_int(name, spec[1], spec[2])
        elif kind == "choice":
            params[name] = trial.suggest_categorical(name, list(spec[1]))
        else:
            raise ValueError(f"search space entry {name!r}: unknown kind {kind!r} (log, float, int, choice)")
    return params


def run_search(objective: Callable[[dict, str, Callable[[float, int], None]], float], n_trials: int,
               output_dir: str, space: Optional[Dict[str, tuple]] = None, seed: int = 0,
               storage: Optional[str] = None, study_name: str = "search", pruner: str = "median",
               heartbeat_s: int = 30) -> dict:
    """Minimise objective(params, trial_dir, report) over n_trials TPE trials (seeded) in the study
    `study_name` of `storage` (a SQLAlchemy URL; None: sqlite:///<output_dir>/search.db), with the trials
    already there counting towards n_trials. Return, and write to search.json, {"best_trial", "best_params",
    "best_value", "trials": [{"number", "params", "value", "state", "duration_s", ...}], ...} over every
    trial in the storage, plus "last_worker": whether this process finished the search's last trial (or
    found it finished), i.e. should do what follows it.

    Each trial starts from seed_everything(seed), so its result depends on its parameters only. A trial
    whose objective raises or returns a non-finite loss is recorded as failed and the search goes on; one
    pruned through report() counts as pruned."""
    optuna = require_optuna()
    if n_trials < 1:
        raise ValueError(f"n_trials must be >= 1, got {n_trials}")
    if pruner not in PRUNERS:
        raise ValueError(f"pruner must be one of {PRUNERS}, got {pruner!r}")
    os.makedirs(output_dir, exist_ok=True)
    url = storage or default_storage(output_dir)
    interrupted = "interrupted (its worker stopped); run again as a new trial with the same parameters"
    study = open_study(optuna, url, study_name, seed, pruner, heartbeat_s,
                       on_interrupted=lambda number: note_trial_folder(output_dir, number, state="FAIL",
                                                                       note=interrupted))
    ran = []  # the trials this process ran
    trial_function = trial_runner(optuna, study, objective, n_trials, output_dir, space or DEFAULT_SPACE, seed, ran)
    finished_before = None
    while True:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        holders = slot_holders(study.get_trials(deepcopy=False))
        done = sum(t.state.is_finished() for t in holders)
        finished_before = done >= n_trials if finished_before is None else finished_before
        if done >= n_trials:
            break
        if len(holders) >= n_trials and not any(t.state.name == "WAITING" for t in holders):
            # the trials left run in other workers, or were interrupted and are not yet stale
            logger.info("search: %d trial(s) running in other workers; waiting (an interrupted one is rerun "
                        "after %d s without a heartbeat)", len(holders) - done, heartbeat_grace_s(heartbeat_s))
            time.sleep(min(heartbeat_s, 5))
            continue
        try:
            study.optimize(trial_function, n_trials=1, catch=(Exception,))
        except KeyboardInterrupt:  # optuna marked the trial FAIL: queue it again, as a stale one would be
            stopped = [t for t in study.get_trials(deepcopy=False) if ran and t.number == ran[-1]]
            if stopped and stopped[0].state.name == "FAIL":
                retry(optuna, study, stopped[0])
                note_trial_folder(output_dir, stopped[0].number, state="FAIL", note=interrupted)
            raise
        finally:
            write_results(study, n_trials, url, output_dir)
    result = write_results(study, n_trials, url, output_dir)
    latest = max((t for t in slot_holders(study.get_trials(deepcopy=False)) if t.datetime_complete),
                 key=lambda t: (t.datetime_complete, t.number))
    result["last_worker"] = finished_before or latest.number in ran
    return result


def trial_runner(optuna, study, objective, n_trials: int, output_dir: str, space: dict, seed: int, ran: list):
    """The function Optuna calls for each trial: claim the trial's slot and folder, run objective, record."""
    worker = f"{socket.gethostname()}:{os.getpid()}"

    def run_trial(trial):
        trials = study.get_trials(deepcopy=False)
        rerun_of = retry_of(next(t for t in trials if t.number == trial.number))
        if rerun_of is None and slot_of(trials, trial.number) >= n_trials:
            trial.set_user_attr("surplus", True)  # left out of the count and of search.json
            raise optuna.TrialPruned(f"trial {trial.number} is not needed: the search's {n_trials} trials are "
                                     "taken (another worker took the last one); it runs nothing")
        params = suggest(trial, space)
        trial_dir = os.path.join(output_dir, f"trial_{trial.number}")
        os.makedirs(trial_dir)  # never reuse a folder: FileExistsError if another search left one here
        trial.set_user_attr("worker", worker)
        ran.append(trial.number)
        note_trial_folder(output_dir, trial.number, state="RUNNING", params=params, worker=worker,
                          retry_of=rerun_of, started=time.time())
        seed_everything(seed)  # the trial's model (adapter init) is the same whatever ran before it
        started = time.perf_counter()
        try:
            value = objective(params, trial_dir, reporter(optuna, trial))
            if value is None or not math.isfinite(value):
                raise ValueError(f"trial {trial.number} gave no finite validation loss ({value})")
        except optuna.TrialPruned as pruned:
            note_trial_folder(output_dir, trial.number, state="PRUNED", note=str(pruned),
                              duration_s=time.perf_counter() - started)
            raise
        except Exception as error:
            note_trial_folder(output_dir, trial.number, state="FAIL", note=f"{type(error).__name__}: {error}",
                              duration_s=time.perf_counter() - started)
            raise
        note_trial_folder(output_dir, trial.number, state="COMPLETE", value=value,
                          duration_s=time.perf_counter() - started)
        return value
    return run_trial


def reporter(optuna, trial) -> Callable[[float, int], None]:
    """report(val_loss, step): hand an evaluation's loss to the trial's pruner; raises TrialPruned to stop."""
    def report(value: float, step: int):
        trial.report(value, step)
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step}: val loss {value:.4g} is worse than the median of "
                                     "the completed trials at that step")
    return report


def note_trial_folder(output_dir: str, number: int, **fields) -> None:
    """Update trial_<number>/trial.json with `fields` (the folder says what became of its trial)."""
    path = os.path.join(output_dir, f"trial_{number}", "trial.json")
    if not os.path.isdir(os.path.dirname(path)):
        return  # the trial ran on another machine
    record = {"number": number}
    if os.path.exists(path):
        with open(path) as f:
            record = json.load(f)
    atomic_write_text(path, json.dumps({**record, **fields}, indent=1))


def trial_record(trial) -> dict:
    duration = trial.duration.total_seconds() if trial.duration is not None else None
    return {"number": trial.number, "params": trial.params, "value": trial.value, "state": trial.state.name,
            "duration_s": duration, "worker": trial.user_attrs.get("worker"), "retry_of": retry_of(trial),
            "intermediate_values": {str(step): v for step, v in sorted(trial.intermediate_values.items())}}


def write_results(study, n_trials: int, url: str, output_dir: str) -> dict:
    """search.json and search.md from the storage: every trial (surplus ones excepted), the best one."""
    trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get("surplus")]
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    best = min(complete, key=lambda t: (t.value, t.number)) if complete else None
    result = {"study_name": study.study_name, "storage": shown_url(url), "n_trials": n_trials,
              "states": {state: sum(t.state.name == state for t in trials)
                         for state in ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")},
              "best_trial": best.number if best else None, "best_params": best.params if best else None,
              "best_value": best.value if best else None, "trials": [trial_record(t) for t in trials]}
    write_shared(os.path.join(output_dir, "search.json"), json.dumps(result, indent=1))
    write_shared(os.path.join(output_dir, "search.md"), to_markdown(result))
    done = sum(t.state.is_finished() for t in slot_holders(trials))
    if best is None and done >= n_trials:
        raise RuntimeError(f"no trial of the search completed; see the log and {output_dir}/trial_<n>/trial.json")
    return result


def to_markdown(result: dict) -> str:
    """search.md: one row per trial (state, value, duration, params, worker, what became of it)."""
    lines = [f"# Search {result['study_name']}: {result['n_trials']} trials", "",
             f"Storage: `{result['storage']}`; best trial: {result['best_trial']} (val loss {result['best_value']})",
             "", "| Trial | State | Val loss | Duration (s) | Params | Worker | Note |", "|---" * 7 + "|"]
    reruns = {t["retry_of"]: t["number"] for t in result["trials"] if t["retry_of"] is not None}
    for t in result["trials"]:
        value = "" if t["value"] is None else f"{t['value']:.4f}"
        duration = "" if t["duration_s"] is None else f"{t['duration_s']:.1f}"
        params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in t["params"].items())
        notes = [f"rerun of trial {t['retry_of']}" if t["retry_of"] is not None else "",
                 f"interrupted, rerun as trial {reruns[t['number']]}" if t["number"] in reruns else "",
                 f"pruned at step {list(t['intermediate_values'])[-1]}" if t["state"] == "PRUNED" else ""]
        lines.append(f"| {t['number']} | {t['state']} | {value} | {duration} | {params} | {t['worker'] or ''} | "
                     f"{'; '.join(note for note in notes if note)} |")
    return "\n".join(lines) + "\n"


def write_shared(path: str, text: str, attempts: int = 5) -> None:
    """atomic_write_text for a file several workers rewrite: one worker's write may remove another's
    temporary file (atomic_write clears the temporaries a killed process left), so try again."""
    for attempt in range(attempts):
        try:
            return atomic_write_text(path, text)
        except FileNotFoundError:
            if attempt == attempts - 1:
                raise
