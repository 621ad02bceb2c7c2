"""The Optuna study behind a search, shared by every worker that points at its storage.

Storage: an Optuna RDB storage (a SQLAlchemy URL: a SQLite file, PostgreSQL for several machines) with a
heartbeat, so that a trial whose worker died (SIGKILL, a lost machine) is found stale, marked failed and run
again as a new trial with the same parameters (its system_attrs "failed_trial" and "retry_history" name
the original, as optuna's RetryHeartbeatStaleTrialCallback does).

Slots: a search of `trials` trials has that many slots. Every trial holds one, in order of trial number,
except an interrupted trial that was run again (its retry holds its slot) and a surplus trial (created by a
worker that lost the race for the last slot; it is failed at once and runs nothing). So the total stays
`trials` over restarts and workers, and the slot, not the trial number, seeds the sampler: the k-th
trial of a search draws the same parameters whether or not an interruption came before it.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import time
import warnings
from typing import Callable, List, Optional

logger = logging.getLogger(__name__)

PRUNER_WARMUP_TRIALS = 2  # the median pruner prunes nothing until this many trials have completed


def heartbeat_grace_s(heartbeat_s: int) -> int:
    """Seconds without a heartbeat after which a running trial counts as interrupted: two missed beats, plus
    two seconds for the database clock's one-second resolution."""
    return 2 * heartbeat_s + 2


def default_storage(output_dir: str) -> str:
    return "sqlite:///" + os.path.abspath(os.path.join(output_dir, "search.db"))


def shown_url(url: str) -> str:
    """The URL with its password hidden (for messages and search.json)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy can parse: show it as given, it holds no parsed password
        return url


def open_study(optuna, url: str, study_name: str, seed: int, pruner: str, heartbeat_s: int,
               on_interrupted: Callable[[int], None]):
    """Create the study in the storage at `url`, or load it when it exists (a resumed or parallel search).
    on_interrupted(trial number) is called for each trial found stale, once it is queued again."""
    storage = open_storage(optuna, url, heartbeat_s, retry_callback(optuna, on_interrupted))
    chosen = (optuna.pruners.MedianPruner(n_startup_trials=PRUNER_WARMUP_TRIALS, n_warmup_steps=0)
              if pruner == "median" else optuna.pruners.NopPruner())
    return optuna.create_study(storage=storage, study_name=study_name, load_if_exists=True, direction="minimize",
                               sampler=slot_seeded_sampler(optuna, seed), pruner=chosen)


def open_storage(optuna, url: str, heartbeat_s: int, on_stale):
    """optuna's RDBStorage with a heartbeat; a URL that cannot be opened is a ValueError naming it."""
    kwargs = {"heartbeat_interval": heartbeat_s, "grace_period": heartbeat_grace_s(heartbeat_s)}
    # optuna >= 4.9 renamed failed_trial_callback, which still works but warns
    names = inspect.signature(optuna.storages.RDBStorage).parameters
    kwargs["heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in names
           else "failed_trial_callback"] = on_stale
    if url.startswith("sqlite"):  # several workers on one file: wait for its write lock, don't fail at once
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    for attempt in range(5):
        try:
            with creation_lock(url), warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # the heartbeat
                return optuna.storages.RDBStorage(url, **kwargs)
        except Exception as error:
            # workers creating a new database together: one finds the tables (or the schema version) that
            # another is writing; the second attempt finds them made
            if attempt < 4 and ("already exists" in str(error) or type(error).__name__ == "IntegrityError"):
                time.sleep(1 + attempt)
                continue
            raise ValueError(
                f"cannot open the search storage {shown_url(url)!r}: {type(error).__name__}: {error}. "
                "--search.storage takes a SQLAlchemy database URL: sqlite:///path/to/search.db (a file in an "
                "existing directory; the default is sqlite:///<output dir>/search.db), or for several machines "
                "postgresql://user:password@host:5432/database (pip install 'gpt2lite[search-postgres]')") from None


@contextlib.contextmanager
def creation_lock(url: str):
    """For a SQLite file: hold an exclusive lock on <file>.lock beside it (POSIX), so that workers started
    together create its tables one at a time. Other URLs, and systems without fcntl: nothing."""
    path = url[len("sqlite:///"):] if url.startswith("sqlite:///") else ""
    try:
        import fcntl
    except ImportError:
        fcntl = None
    if not path or path == ":memory:" or fcntl is None or not os.path.isdir(os.path.dirname(path) or "."):
        yield
        return
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def retry_callback(optuna, on_interrupted: Callable[[int], None]):
    """The storage's callback for each trial found stale: queue it again (same parameters), then tell."""
    def on_stale(study, trial):
        retry(optuna, study, trial)
        logger.warning("search: trial %d was interrupted (no heartbeat); it runs again as a new trial", trial.number)
        on_interrupted(trial.number)
    return on_stale


def retry(optuna, study, trial) -> None:
    """Queue a failed trial again with its parameters, as optuna's RetryHeartbeatStaleTrialCallback does."""
    history = list(trial.system_attrs.get("retry_history", [])) + [trial.number]
    system_attrs = {**trial.system_attrs, "failed_trial": history[0], "retry_history": history}
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.WAITING, params=trial.params,
                                              distributions=trial.distributions, user_attrs=trial.user_attrs,
                                              system_attrs=system_attrs))


def retry_of(trial) -> Optional[int]:
    """The number of the interrupted trial that `trial` runs again, or None."""
    history = trial.system_attrs.get("retry_history")
    return history[-1] if history else None


def slot_holders(trials) -> List:
    """The trials that count towards the search's total (see the module docstring), in number order."""
    superseded = {number for t in trials for number in t.system_attrs.get("retry_history", [])}
    return sorted((t for t in trials if t.number not in superseded and not t.user_attrs.get("surplus")),
                  key=lambda t: t.number)


def slot_of(trials, number: int) -> int:
    """The slot trial `number` holds: how many slot holders come before it."""
    return sum(1 for t in slot_holders(trials) if t.number < number)


def slot_seeded_sampler(optuna, seed: int):
    """TPE whose random state is seeded, for each trial, by (seed, the trial's slot)."""
    class SlotSeededTPE(optuna.samplers.BaseSampler):
        def __init__(self):
            self.tpe = optuna.samplers.TPESampler(seed=seed)

        def before_trial(self, study, trial):
            slot = slot_of(study.get_trials(deepcopy=False), trial.number)
            self.tpe = optuna.samplers.TPESampler(seed=(seed * 1_000_003 + slot) % 2**32)
            self.tpe.before_trial(study, trial)

        def infer_relative_search_space(self, study, trial):
            return self.tpe.infer_relative_search_space(study, trial)

        def sample_relative(self, study, trial, search_space):
            return self.tpe.sample_relative(study, trial, search_space)

        def sample_independent(self, study, trial, param_name, param_distribution):
            return self.tpe.sample_independent(study, trial, param_name, param_distribution)

        def after_trial(self, study, trial, state, values):
            self.tpe.after_trial(study, trial, state, values)

        def reseed_rng(self):
            pass  # each trial is seeded from its slot

    return SlotSeededTPE()
