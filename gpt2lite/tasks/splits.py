"""Where a task's examples come from: `DataConfig`, the same fields for every task, and its three splits.

    splits = load_splits(DataConfig(task="summarization", train="my.jsonl"))
    # one file: a seeded shuffle cut into three disjoint parts, 80 / 10 / 10 by default

Train, validation and test are always disjoint: validation picks the best checkpoint and stops early, test
gives the reported scores. A split without its own file is cut from the train file (seeded); without a
train file the hub dataset's splits are used (a missing one cut from its train split), and with
`allow_fallback` the offline fallback corpus of `text_splits.summarization_splits` / `lm_texts`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch

from gpt2lite.tasks import DataError, load_table
from gpt2lite.tasks.loading import lm_separator

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


def split_three(table, validation_fraction: float, test_fraction: float, seed: int, where: str,
                cut_validation: bool = True, cut_test: bool = True):
    """(train, validation, test): a seeded shuffle of `table` cut into disjoint parts. A part that is not
    cut (cut_validation / cut_test False) is returned as None. Works on datasets.Dataset and lists."""
    n = len(table)
    n_validation = max(1, round(n * validation_fraction)) if cut_validation else 0
    n_test = max(1, round(n * test_fraction)) if cut_test else 0
    if n - n_validation - n_test < 1:
        raise DataError(f"{where} has {n} rows: too few to cut {n_validation} validation and {n_test} test rows "
                        "and keep one for training; give more rows or separate --data.validation/--data.test files")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    parts = order[:n_test], order[n_test:n_test + n_validation], order[n_test + n_validation:]

    def take(indices):
        if not indices:
            return None
        return [table[i] for i in indices] if isinstance(table, list) else table.select(indices)

    test, validation, train = (take(indices) for indices in parts)
    return train, validation, test


def load_splits(config: DataConfig, allow_fallback: bool = False):
    """text_splits.TextSplits of `config`: local files, else the hub dataset, else (allow_fallback) the
    offline corpus. The description names each split's source and size."""
    from gpt2lite.tasks.text_splits import TextSplits

    input_column, target_column = config.columns
    if config.train is not None:
        files = {s: getattr(config, s) for s in HUB_SPLITS if getattr(config, s)}
        lm = config.task == "language_modeling"  # a text file's lines keep their line endings
        tables = {s: load_table(data_files=files, split=s, keep_linebreaks=lm) for s in files}
        origin = {s: files[s] for s in files}
    elif config.dataset is not None or allow_fallback:
        return _hub_or_fallback(config, allow_fallback)
    else:
        raise DataError("no data: give a file with --data.train (JSON Lines, CSV or text), or a hub dataset with "
                        "--data.dataset (and --data.dataset_config)")
    train, validation, test = split_three(tables["train"], config.validation_fraction, config.test_fraction,
                                          config.seed, repr(config.train), "validation" not in tables,
                                          "test" not in tables)
    for name, cut, fraction in (("validation", validation, config.validation_fraction),
                                ("test", test, config.test_fraction)):
        if cut is not None:
            tables[name] = cut
            origin[name] = f"{fraction:.0%} of {config.train} (seed {config.seed})"
    tables["train"] = train
    description = "; ".join(f"{s}: {len(tables[s])} rows from {origin[s]}" for s in HUB_SPLITS)
    logger.info("data: %s", description)
    separators = {s: lm_separator(files.get(s, config.train)) for s in HUB_SPLITS}  # a cut split: the train file's
    return TextSplits(tables["train"], tables["validation"], tables["test"], input_column, target_column or "",
                      f"local files ({description})", separators=separators)


def _hub_or_fallback(config: DataConfig, allow_fallback: bool):
    from gpt2lite.tasks.text_splits import TextSplits, lm_texts, summarization_splits

    input_column, target_column = config.columns
    if config.task == "summarization":
        splits = summarization_splits(config.dataset, config.dataset_config, None, input_column, target_column,
                                      allow_fallback=allow_fallback, seed=config.seed, max_rows=config.hub_rows)
    elif config.task == "language_modeling":
        texts = lm_texts(config.dataset, config.dataset_config, None, input_column, allow_fallback=allow_fallback)
        rows = [[{texts.source_column: text} for text in getattr(texts, s)] for s in HUB_SPLITS]  # tables, as files give
        splits = TextSplits(*rows, texts.source_column, texts.target_column, texts.description, texts.fallback,
                            texts.separators)
    else:
        if config.dataset is None:
            raise DataError("classification has no offline fallback data: give --data.train or --data.dataset")
        splits = _hub_classification(config)
    sizes = ", ".join(f"{s} {len(getattr(splits, s))}" for s in HUB_SPLITS)
    description = splits.description if splits.fallback else f"{splits.description} ({sizes} rows)"
    logger.info("data: %s", description)
    return TextSplits(splits.train, splits.validation, splits.test, splits.source_column, splits.target_column,
                      description, splits.fallback, splits.separators)


def _hub_classification(config: DataConfig):
    """A hub dataset's splits; one it lacks (e.g. test) is cut from its train split."""
    from gpt2lite.tasks.text_splits import TextSplits

    tables, missing = {}, []
    for split in HUB_SPLITS:
        try:
            tables[split] = load_table(config.dataset, config.dataset_config, split=split,
                                       max_rows=config.hub_rows[split])
        except DataError:
            if split == "train":
                raise
            missing.append(split)
    train, validation, test = split_three(tables["train"], config.validation_fraction, config.test_fraction,
                                          config.seed, config.dataset, "validation" in missing, "test" in missing)
    tables["train"] = train
    tables.update({k: v for k, v in (("validation", validation), ("test", test)) if v is not None})
    cut = f"; {', '.join(missing)} cut from its train split (seed {config.seed})" if missing else ""
    return TextSplits(tables["train"], tables["validation"], tables["test"], *config.columns,
                      f"{config.dataset} from the Hugging Face Hub{cut}")
