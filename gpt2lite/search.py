"""Hyperparameter search with Optuna (an optional extra: pip install optuna, or gpt2lite[search]).

    result = run_search(objective, n_trials=8, output_dir="runs/search", space=space_for("lora"))
    # objective(params, trial_dir) -> validation loss; params holds lr, epochs (+ rank, alpha, dropout for LoRA)

Each trial works in output_dir/trial_<n>/; output_dir/search.json records every trial and the best one.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Callable, Dict, Optional

from .files import atomic_write_text

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


@dataclass(frozen=True)
class SearchConfig:
    """A hyperparameter search of each fine-tuning run (off when trials == 0)."""

    trials: int = 0  # Optuna TPE trials per method, each in <output>/<method>/trial_<n>/; 0: no search
    retrain_best_model: bool = False  # then train the best configuration again on the whole training split
    train_samples: Optional[int] = None  # examples each trial trains on (None: data.max_train_samples)

    def __post_init__(self):
        if self.trials < 0:
            raise ValueError(f"search.trials must be >= 0, got {self.trials}")
        if self.train_samples is not None and self.train_samples < 1:
            raise ValueError(f"search.train_samples must be None or >= 1, got {self.train_samples}")


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


def run_search(objective: Callable[[dict, str], float], n_trials: int, output_dir: str,
               space: Optional[Dict[str, tuple]] = None, seed: int = 0) -> dict:
    """Minimise objective(params, trial_dir) over n_trials TPE trials (seeded); return and write
    {"best_trial", "best_params", "best_value", "trials": [{"number", "params", "value", "state"}]}.

    A trial whose objective raises an exception or returns a non-finite loss is recorded as failed and
    the search goes on."""
    optuna = require_optuna()
    if n_trials < 1:
        raise ValueError(f"n_trials must be >= 1, got {n_trials}")
    space = space or DEFAULT_SPACE
    os.makedirs(output_dir, exist_ok=True)

    def optuna_objective(trial):
        params = suggest(trial, space)
        trial_dir = os.path.join(output_dir, f"trial_{trial.number}")
        value = objective(params, trial_dir)
        if value is None or not math.isfinite(value):
            raise ValueError(f"trial {trial.number} gave no finite validation loss ({value})")
        return value

    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed))
    study.optimize(optuna_objective, n_trials=n_trials, catch=(Exception,))
    trials = [{"number": t.number, "params": t.params, "value": t.value, "state": t.state.name} for t in study.trials]
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    if not complete:
        raise RuntimeError(f"all {n_trials} trials failed; see the log and {output_dir}/trial_<n>/")
    best = study.best_trial
    result = {"best_trial": best.number, "best_params": best.params, "best_value": best.value, "trials": trials}
    atomic_write_text(os.path.join(output_dir, "search.json"), json.dumps(result, indent=1))
    logger.info("search: best trial %d, val loss %.4f, params %s", best.number, best.value, best.params)
    return result
