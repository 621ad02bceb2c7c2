"""Where a task's examples come from: `DataConfig`, the same fields for every task, and its three splits.

    splits = load_splits(DataConfig(task="summarization", train="my.jsonl"))
    # one file: a seeded shuffle cut into three disjoint parts, 80 / 10 / 10 by default

Train, validation and test are always disjoint, for every task and every source: validation picks the best
checkpoint and stops early, test gives the reported scores. One rule cuts what a source lacks: local files
(a split without its own file) and a hub dataset (a split it does not have) alike, the missing validation
and test parts are cut from the train split by one seeded shuffle (`split_three`). Without a train file
the hub dataset's splits are used; where it cannot be had, with `allow_fallback`, the offline docstring
corpus of tasks.docstrings stands in for summarization and language modelling: `fallback` is set, the
description begins "OFFLINE FALLBACK DATA" and a warning is logged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, Optional

from gpt2lite.errors import DataError
from gpt2lite.tasks.docstrings import docstring_corpus
from gpt2lite.tasks.loading import ROWS_SEPARATOR, as_list, lm_separator, load_table, require_columns, seeded_order

logger = logging.getLogger(__name__)

TASKS = ("summarization", "language_modeling", "classification")
# task -> (input column, target column) used when DataConfig leaves them None
DEFAULT_COLUMNS = {"summarization": ("article", "highlights"), "language_modeling": ("text", None),
                   "classification": ("text", "label")}
HUB_SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class DataConfig:
    """Which examples a task trains and is scored on, and how they are cut to length."""

    task: str = "summarization"  # "summarization" | "language_modeling" | "classification"
    train: Optional[str] = None  # local .jsonl/.json/.csv/.tsv/.txt/.raw file; None: the hub `dataset`
    validation: Optional[str] = None  # None: cut from the train file (validation_fraction of it)
    test: Optional[str] = None  # None: cut from the train file (test_fraction of it)
    dataset: Optional[str] = None  # hub dataset used when no train file is given, e.g. "cnn_dailymail"
    dataset_config: Optional[str] = None  # its configuration, e.g. "3.0.0"
    input_column: Optional[str] = None  # the text read; None: "article" (summarization), else "text"
    target_column: Optional[str] = None  # the summary or the class id; None: "highlights" / "label"
    template: Optional[str] = None  # summarization: "{article}...{summary}" (None: DEFAULT_TEMPLATE); else "{text}"
    max_length: Optional[int] = None  # tokens per example (LM: per block); None: the model's context
    num_labels: Optional[int] = None  # classification; None: 1 + the largest label in the train split
    validation_fraction: float = 0.1  # of the train file, when validation has no file of its own
    test_fraction: float = 0.1  # of the train file, when test has no file of its own
    seed: int = 0  # the shuffle that cuts splits and draws capped samples
    max_train_samples: Optional[int] = None  # cap on training examples (LM: blocks); None: all
    max_validation_samples: Optional[int] = None  # cap on validation examples (LM: blocks); None: all
    max_test_samples: Optional[int] = None  # examples generated and scored (LM: texts continued)
    stride: Optional[int] = None  # language modelling: perplexity window stride; None: max_length // 2

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"data.task must be one of {TASKS}, got {self.task!r}")
        for name in ("validation_fraction", "test_fraction"):
            if not 0.0 < getattr(self, name) < 0.5:
                raise ValueError(f"data.{name} must be in (0, 0.5), got {getattr(self, name)}")
        for name in ("max_length", "num_labels", "max_train_samples", "max_validation_samples",
                     "max_test_samples", "stride"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"data.{name} must be None or >= 1, got {value}")
        if self.train is None and (self.validation or self.test):
            raise ValueError("data.validation / data.test files need a data.train file too")
        if self.stride is not None and self.max_length is not None and self.stride > self.max_length:
            raise ValueError(f"data.stride={self.stride} exceeds the perplexity window of data.max_length="
                             f"{self.max_length} tokens; use a stride <= the window")
        if self.template is not None:
            self._check_template()

    def _check_template(self):
        """The template's placeholders, checked before any data is read (the tasks check them again)."""
        if self.task == "summarization":
            from gpt2lite.tasks.summarization import PromptTemplate

            PromptTemplate.parse(self.template)
        elif self.template.count("{text}") != 1:
            raise ValueError(f"data.template must hold '{{text}}' once for {self.task}, got {self.template!r}")

    @property
    def hub_rows(self) -> dict:
        """Rows to read of each hub split: the sample caps, so that a capped run streams only the first rows
        it uses instead of downloading whole splits (None: all). Language modelling caps blocks, not rows."""
        if self.task == "language_modeling":
            return {"train": None, "validation": None, "test": None}
        return {"train": self.max_train_samples, "validation": self.max_validation_samples,
                "test": self.max_test_samples}

    @property
    def columns(self):
        """(input column, target column) with the task's defaults filled in."""
        default_input, default_target = DEFAULT_COLUMNS[self.task]
        return self.input_column or default_input, self.target_column or default_target


@dataclass
class TextSplits:
    """train / validation / test tables of one task (datasets.Dataset or lists of dicts), and where they came
    from."""

    train: object
    validation: object
    test: object
    input_column: str
    target_column: str
    description: str
    fallback: bool = False
    # language modelling: split -> what joins its rows into one text ("" where absent): "" for a text file's
    # lines (they keep their line endings: the file's exact text), "\n\n" for a table's rows (tasks.loading)
    separators: Dict[str, str] = field(default_factory=dict)

    def separator(self, split: str) -> str:
        return self.separators.get(split, "")


def column_values(table, column: str) -> list:
    """The values of one column of a table (a list of dicts or a datasets.Dataset), checked to exist."""
    if not isinstance(table, list):
        require_columns(table, [column])
    return as_list(table, column)


def split_three(table, validation_fraction: float, test_fraction: float, seed: int, where: str,
                cut_validation: bool = True, cut_test: bool = True):
    """(train, validation, test): a seeded shuffle of `table` cut into disjoint parts, the one cut of every
    task and source. A part that is not cut (cut_validation / cut_test False) is returned as None. Works on
    datasets.Dataset and lists. Nothing to cut: the table itself, in its order (a corpus stays in order)."""
    if not (cut_validation or cut_test):
        return table, None, None
    n = len(table)
    n_validation = max(1, round(n * validation_fraction)) if cut_validation else 0
    n_test = max(1, round(n * test_fraction)) if cut_test else 0
    if n - n_validation - n_test < 1:
        raise DataError(f"{where} has {n} rows: too few to cut {n_validation} validation and {n_test} test rows "
                        "and keep one for training; give more rows or separate --data.validation/--data.test files")
    order = seeded_order(n, seed)
    parts = order[:n_test], order[n_test:n_test + n_validation], order[n_test + n_validation:]

    def take(indices):
        if not indices:
            return None
        return [table[i] for i in indices] if isinstance(table, list) else table.select(indices)

    test, validation, train = (take(indices) for indices in parts)
    return train, validation, test


def load_splits(config: DataConfig, allow_fallback: bool = False) -> TextSplits:
    """The three splits of `config`: local files, else the hub dataset, else (allow_fallback) the offline
    corpus. The description names each split's source and size."""
    if config.train is not None:
        return _from_files(config)
    if config.dataset is not None:
        try:
            return _from_hub(config)
        except DataError as error:
            if not allow_fallback or config.task == "classification":
                raise
            return _fallback(config, str(error).splitlines()[0].rstrip("."))
    if allow_fallback and config.task != "classification":
        return _fallback(config, "no --data.train file or --data.dataset was given")
    if config.task == "classification" and allow_fallback:
        raise DataError("classification has no offline fallback data: give --data.train or --data.dataset")
    raise DataError("no data: give a file with --data.train (JSON Lines, CSV or text), or a hub dataset with "
                    "--data.dataset (and --data.dataset_config)")


def _cut_missing(tables: dict, config: DataConfig, where: str, name: str) -> dict:
    """split -> how it was had; the validation / test parts absent from `tables` cut from its train table."""
    train, validation, test = split_three(tables["train"], config.validation_fraction, config.test_fraction,
                                          config.seed, where, "validation" not in tables, "test" not in tables)
    origin = {}
    for split, cut, fraction in (("validation", validation, config.validation_fraction),
                                 ("test", test, config.test_fraction)):
        if cut is not None:
            tables[split] = cut
            origin[split] = f"{fraction:.0%} of {name} (seed {config.seed})"
    tables["train"] = train
    return origin


def _from_files(config: DataConfig) -> TextSplits:
    files = {s: getattr(config, s) for s in HUB_SPLITS if getattr(config, s)}
    lm = config.task == "language_modeling"  # a text file's lines keep their line endings
    tables = {s: load_table(data_files=files, split=s, keep_linebreaks=lm) for s in files}
    origin = {**files, **_cut_missing(tables, config, repr(config.train), config.train)}
    description = "; ".join(f"{s}: {len(tables[s])} rows from {origin[s]}" for s in HUB_SPLITS)
    logger.info("data: %s", description)
    separators = {s: lm_separator(files.get(s, config.train)) for s in HUB_SPLITS}  # a cut split: the train file's
    input_column, target_column = config.columns
    return TextSplits(tables["train"], tables["validation"], tables["test"], input_column, target_column or "",
                      f"local files ({description})", separators=separators)


def _from_hub(config: DataConfig) -> TextSplits:
    """The hub dataset's splits; one it lacks (e.g. test) is cut from its train split, as for a local file."""
    tables = {}
    for split in HUB_SPLITS:
        try:
            tables[split] = load_table(config.dataset, config.dataset_config, split=split,
                                       max_rows=config.hub_rows[split])
        except DataError:
            if split == "train":
                raise
    name = config.dataset + (f" ({config.dataset_config})" if config.dataset_config else "")
    origin = {s: "the Hugging Face Hub" for s in tables}
    origin.update(_cut_missing(tables, config, name, "its train split"))
    description = f"{name}: " + "; ".join(f"{s}: {len(tables[s])} rows from {origin[s]}" for s in HUB_SPLITS)
    logger.info("data: %s", description)
    input_column, target_column = config.columns
    return TextSplits(tables["train"], tables["validation"], tables["test"], input_column, target_column or "",
                      description, separators={s: ROWS_SEPARATOR for s in HUB_SPLITS})


def _fallback(config: DataConfig, reason: str) -> TextSplits:
    """The offline stand-in: the standard library's docstrings (tasks.docstrings), said so loudly."""
    corpus = docstring_corpus(None)
    not_what = f"not {config.dataset}" if config.dataset else "no dataset given"
    if config.task == "language_modeling":
        texts = {s: [{"text": f"{e['target']}\n{e['source']}\n\n"} for e in corpus[s]] for s in HUB_SPLITS}
        description = (f"OFFLINE FALLBACK DATA, {not_what}: {reason}. Using the Python standard library's "
                       f"docstrings as text ({len(texts['train'])} train / {len(texts['validation'])} validation "
                       f"/ {len(texts['test'])} test documents).")
        splits = TextSplits(texts["train"], texts["validation"], texts["test"], "text", "text", description, True)
    else:
        description = (f"OFFLINE FALLBACK DATA, {not_what}: {reason}. Using a summarization corpus built from the "
                       f"Python standard library's docstrings ({len(corpus['train'])} train / "
                       f"{len(corpus['validation'])} validation / {len(corpus['test'])} test; target = the "
                       "docstring's summary line, source = the signature and the rest of the docstring).")
        splits = TextSplits(corpus["train"], corpus["validation"], corpus["test"], "source", "target", description,
                            True)
    logger.warning(description)
    return splits
