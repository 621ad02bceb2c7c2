"""train / validation / test tables of a text task, with an offline fallback that says so.

    splits = summarization_splits("cnn_dailymail", "3.0.0")    # local files, else the hub, else docstrings
    texts = lm_texts("wikitext", "wikitext-2-raw-v1")           # the same for language modelling

Where the hub dataset cannot be had, the standard library's docstring corpus (gpt2lite.tasks.docstrings)
stands in: `fallback` is set, the description begins "OFFLINE FALLBACK DATA" and a warning is logged.
gpt2lite.tasks.splits.load_splits builds on these for the command line's DataConfig.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch

from gpt2lite.tasks import DataError, docstring_corpus, load_table
from gpt2lite.tasks.loading import ROWS_SEPARATOR, as_list, lm_separator, require_columns

logger = logging.getLogger(__name__)


@dataclass
class TextSplits:
    """train / validation / test tables of one text task, and where they came from."""

    train: object
    validation: object
    test: object
    source_column: str
    target_column: str
    description: str
    fallback: bool = False
    # language modelling: split -> what joins its rows into one text ("" where absent): "" for a text file's
    # lines (they keep their line endings: the file's exact text), "\n\n" for a table's rows (tasks.loading)
    separators: Dict[str, str] = field(default_factory=dict)

    def separator(self, split: str) -> str:
        return self.separators.get(split, "")


def _split_off(table, fraction: float, seed: int):
    """(rest, held out): a seeded shuffle's last `fraction` held out."""
    if isinstance(table, list):
        order = torch.randperm(len(table), generator=torch.Generator().manual_seed(seed)).tolist()
        table = [table[i] for i in order]
        cut = len(table) - max(1, int(len(table) * fraction))
        return table[:cut], table[cut:]
    parts = table.train_test_split(test_size=max(1, int(len(table) * fraction)), seed=seed)
    return parts["train"], parts["test"]


def summarization_splits(dataset: Optional[str] = "cnn_dailymail", config_name: Optional[str] = "3.0.0",
                         data_files=None, source_column: str = "article", target_column: str = "highlights",
                         allow_fallback: bool = True, fallback_examples: Optional[int] = None,
                         seed: int = 0, max_rows: Optional[Dict[str, Optional[int]]] = None,
                         keep_linebreaks: bool = False) -> TextSplits:
    """Local files (one file: 10% held out for validation and test), else the hub dataset, else the
    standard library's docstring corpus (see tasks.docstrings; at most fallback_examples examples, all
    ~2,000 by default), with a description that says which. keep_linebreaks: text files' rows keep their
    line endings (tasks.loading.load_table)."""
    if data_files is not None:
        files = data_files if isinstance(data_files, dict) else {"train": data_files}
        train = load_table(data_files=files, split="train", keep_linebreaks=keep_linebreaks)
        if "validation" in files:
            validation = load_table(data_files=files, split="validation", keep_linebreaks=keep_linebreaks)
        else:
            train, validation = _split_off(train, 0.1, seed)
        test = load_table(data_files=files, split="test", keep_linebreaks=keep_linebreaks) if "test" in files \
            else validation
        return TextSplits(train, validation, test, source_column, target_column,
                          f"local files: {files}")
    try:
        tables = [load_table(dataset, config_name, split=s, max_rows=(max_rows or {}).get(s))
                  for s in ("train", "validation", "test")]
        return TextSplits(*tables, source_column, target_column, f"{dataset} ({config_name}) from the Hugging Face Hub")
    except DataError as error:
        if not allow_fallback:
            raise
        reason = str(error).splitlines()[0].rstrip(".")
    corpus = docstring_corpus(fallback_examples)
    description = (f"OFFLINE FALLBACK DATA, not {dataset}: {reason}. Using a summarization corpus built from the "
                   f"Python standard library's docstrings ({len(corpus['train'])} train / {len(corpus['validation'])} "
                   f"validation / {len(corpus['test'])} test; target = the docstring's summary line, source = the "
                   "signature and the rest of the docstring).")
    logger.warning(description)
    return TextSplits(corpus["train"], corpus["validation"], corpus["test"], "source", "target", description, True)


def lm_texts(dataset: Optional[str] = "wikitext", config_name: Optional[str] = "wikitext-2-raw-v1",
             data_files=None, text_column: str = "text", allow_fallback: bool = True,
             fallback_examples: Optional[int] = None) -> TextSplits:
    """Texts for language modelling: local files ({"train": ..., "validation": ...}, or one file of which
    10% is held out), the hub dataset, or else the docstring corpus (sources and summaries as text).
    `separators` says how each split's rows are joined into one text: a text file's lines keep their line
    endings and are joined as they are (the file's exact text); the rows of a table or of the hub dataset
    are joined with "\n\n", as Hugging Face's perplexity guide joins WikiText's."""
    if data_files is not None or dataset is not None:
        try:
            splits = summarization_splits(dataset, config_name, data_files, text_column, text_column,
                                          allow_fallback=False, keep_linebreaks=True)
            texts = [column_values(table, text_column) for table in (splits.train, splits.validation, splits.test)]
            return TextSplits(*texts, text_column, text_column, splits.description,
                              separators=_separators(data_files))
        except DataError as error:
            if data_files is not None or not allow_fallback:
                raise
            reason = str(error).splitlines()[0].rstrip(".")
    corpus = docstring_corpus(fallback_examples)
    texts = [[f"{e['target']}\n{e['source']}\n\n" for e in corpus[s]] for s in ("train", "validation", "test")]
    description = (f"OFFLINE FALLBACK DATA, not {dataset}: {reason}. Using the Python standard library's "
                   f"docstrings as text ({len(texts[0])} train / {len(texts[1])} validation documents).")
    logger.warning(description)
    return TextSplits(*texts, "text", "text", description, fallback=True)


def _separators(data_files) -> Dict[str, str]:
    """lm_texts' separators: each split's file's (a split cut from the train file: its; a hub dataset: "\n\n")."""
    if data_files is None:
        return {s: ROWS_SEPARATOR for s in ("train", "validation", "test")}
    files = data_files if isinstance(data_files, dict) else {"train": data_files}

    def first(paths):
        return paths if isinstance(paths, str) else list(paths)[0]

    named = {s: first(files.get(s, files["train"])) for s in ("train", "validation")}
    named["test"] = first(files["test"]) if "test" in files else named["validation"]
    return {s: lm_separator(path) for s, path in named.items()}


def column_values(table, column: str) -> list:
    """The values of one column of a table (a list of dicts or a datasets.Dataset), checked to exist."""
    if not isinstance(table, list):
        require_columns(table, [column])
    return as_list(table, column)
