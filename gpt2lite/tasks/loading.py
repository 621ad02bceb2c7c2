"""Loading tables of examples through the `datasets` library: hub names when online, local files always.

Every failure that can be detected before training (an unreadable file, a missing column, an empty split)
raises `DataError` with a message that names the problem and the fix, so that a run never dies mid-epoch
on bad data.
"""

from __future__ import annotations

import codecs
import json
import logging
import os
from typing import Dict, List, Optional, Sequence, Union

from gpt2lite.errors import DataError
from gpt2lite.hub.pretrained import hub_reachable

logger = logging.getLogger(__name__)

# file extension -> the `datasets` builder that reads it
FILE_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "csv", ".txt": "text", ".raw": "text"}
EXPECTED_CONTENT = {"json": "one JSON object per line (JSON Lines) or a JSON list of objects",
                    "csv": "a header line naming its columns, then one row per line",
                    "text": "one example (or one line of a corpus) per line"}

# Hub datasets that moved under an owner; huggingface_hub >= 1.0 no longer resolves the old single-segment ids
CANONICAL_DATASETS = {"cnn_dailymail": "abisee/cnn_dailymail", "wikitext": "Salesforce/wikitext"}

DataFiles = Union[str, Sequence[str], Dict[str, Union[str, Sequence[str]]]]

# How language modelling joins a split's rows into one text: a text file's rows are its lines with their line
# endings kept (keep_linebreaks), so "" gives back the file's exact text; the rows of a table (JSON Lines,
# CSV, a hub dataset such as WikiText) are joined with a blank line, as Hugging Face's perplexity guide does
# ("\n\n".join(test["text"])).
LINES_SEPARATOR, ROWS_SEPARATOR = "", "\n\n"


def lm_separator(path: Optional[str]) -> str:
    """The separator that joins the rows of `path` (None: a hub dataset) into one language-modelling text."""
    if path is not None and FILE_FORMATS.get(os.path.splitext(os.fspath(path))[1].lower()) == "text":
        return LINES_SEPARATOR
    return ROWS_SEPARATOR


def load_table(dataset: Optional[str] = None, config_name: Optional[str] = None,
               data_files: Optional[DataFiles] = None, split: str = "train", max_rows: Optional[int] = None,
               keep_linebreaks: bool = False):
    """One split of a dataset as a `datasets.Dataset`.

    dataset: a Hugging Face Hub name ("abisee/cnn_dailymail") with config_name ("3.0.0"); the old names of
    CANONICAL_DATASETS ("cnn_dailymail", "wikitext") are read from their repos' new ids.
    data_files: local .json/.jsonl/.csv/.tsv/.txt/.raw files instead: a path, a list of paths (all one
    split), or {"train": ..., "validation": ...}. Text files give one row per line in a "text" column.
    max_rows: keep only the split's first max_rows rows. From the hub they are streamed, so only the data
    files (and parts of files) that hold them are downloaded, not the whole split (2,000 CNN/DailyMail
    articles come from its first train file of three).
    """
    import datasets

    if (dataset is None) == (data_files is None):
        raise DataError("pass either a hub dataset name or data_files (local files), not both and not neither")
    if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1):
        raise DataError(f"max_rows must be a positive integer or None, got {max_rows!r}")
    if data_files is not None:
        table = _load_local(data_files, split, keep_linebreaks)
        return table.select(range(max_rows)) if max_rows is not None and max_rows < len(table) else table
    if not hub_reachable():
        raise DataError(f"cannot load {dataset!r} from the Hugging Face Hub: it is unreachable (offline, or "
                        "HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set). Pass local files instead (data_files=... / "
                        "gpt2lite finetune --data.train FILE), e.g. a JSONL file with one object per line.")
    try:
        repo_id = CANONICAL_DATASETS.get(dataset, dataset)
        if max_rows is None:
            table = datasets.load_dataset(repo_id, config_name, split=split)
        else:
            stream = datasets.load_dataset(repo_id, config_name, split=split, streaming=True)
            table = datasets.Dataset.from_list(list(stream.take(max_rows)))
    except Exception as error:  # no network, unknown name, unknown split: say what to do instead
        raise DataError(
            f"could not load {dataset!r}{f' ({config_name})' if config_name else ''} split {split!r} "
            f"from the Hugging Face Hub: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}\n"
            "Without the network, pass local files instead (data_files=... / gpt2lite finetune --data.train "
            "FILE), e.g. a JSONL file with one object per line."
        ) from None
    return require_rows(table, f"{dataset} split {split!r}")


def _load_local(data_files: DataFiles, split: str, keep_linebreaks: bool = False):
    import datasets

    if isinstance(data_files, dict):
        if split not in data_files:
            raise DataError(f"data_files has no {split!r} split; it has {sorted(data_files)}")
        paths = data_files[split]
    else:
        paths = data_files
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not paths:
        raise DataError(f"no files given for split {split!r}")
    paths = [os.fspath(p) for p in paths]
    formats = set()
    for path in paths:
        if not os.path.isfile(path):
            raise DataError(f"data file {path!r} does not exist")
        extension = os.path.splitext(path)[1].lower()
        if extension not in FILE_FORMATS:
            raise DataError(f"cannot tell the format of {path!r}; use one of {sorted(FILE_FORMATS)}")
        if os.path.getsize(path) == 0:
            raise DataError(f"{path!r} is empty (0 bytes); a {extension[1:]} file needs "
                            f"{EXPECTED_CONTENT[FILE_FORMATS[extension]]}")
        check_utf8(path)
        formats.add(FILE_FORMATS[extension])
    if len(formats) > 1:
        raise DataError(f"the files of one split must share a format, got {sorted(formats)} from {paths}")
    builder = formats.pop()
    if builder == "text" and keep_linebreaks:
        return require_rows(datasets.Dataset.from_dict({"text": text_lines(paths)}), ", ".join(paths))
    if builder == "json":
        for path in paths:
            check_json_file(path)
    keywords = {"delimiter": "\t"} if builder == "csv" and paths[0].lower().endswith(".tsv") else {}
    try:
        table = datasets.load_dataset(builder, data_files={"data": paths}, split="data", **keywords)
    except Exception as error:
        if "corresponds to no data" in str(error):  # how `datasets` says that the files hold no rows
            raise DataError(f"the dataset {', '.join(paths)} has no rows") from None
        raise DataError(f"could not read {paths} as {builder}: {type(error).__name__}: {error}") from None
    return require_rows(table, ", ".join(paths))


def text_lines(paths: Sequence[str]) -> List[str]:
    """The lines of text files, each with its line ending as it is in the file (no newline translation)."""
    lines = []
    for path in paths:
        with open(path, encoding="utf-8", newline="") as f:
            lines.extend(f)
    return lines


def check_utf8(path: str, block_size: int = 2**22):
    """Raise DataError naming the file, line and byte where it stops being UTF-8 (read by 4 MB blocks)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, line = 0, 1  # of the block's first byte
    with open(path, "rb") as f:
        while True:
            block = f.read(block_size)
            pending = decoder.getstate()[0]  # the previous block's last bytes: a character cut in two
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as error:  # error.start counts from the first pending byte
                data, bad = pending + block, error.start
                line += data[:bad].count(b"\n")
                raise DataError(f"{path!r} is not UTF-8 text: byte {offset - len(pending) + bad} (line {line}) is "
                                f"{data[bad:bad + 1]!r}. Save it as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None
            if not block:
                return
            offset, line = offset + len(block), line + block.count(b"\n")


def check_json_file(path: str):
    """Raise DataError naming the first line that is not valid JSON (JSON Lines), unless the whole file is
    one valid JSON document (a list of objects, or an object of columns)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not text.strip():
        raise DataError(f"{path!r} is empty; it needs one JSON object per line (JSON Lines) or a JSON list")
    try:
        json.loads(text)
        return
    except json.JSONDecodeError:
        pass
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path!r} line {number} is not valid JSON ({error.msg} at column {error.colno}): "
                            f"{line[:80]!r}. Each line must be one JSON object, e.g. "
                            '{"article": "...", "highlights": "..."}') from None
        if not isinstance(value, dict):
            raise DataError(f"{path!r} line {number} is a JSON {type(value).__name__}, expected an object "
                            "with one key per column")


def require_rows(table, where: str):
    """The table itself, or DataError when it has no rows."""
    if len(table) == 0:
        raise DataError(f"the dataset {where} has no rows")
    return table


COLUMNS_HINT = ("Name the text and target columns with --data.input_column and --data.target_column "
                "(DataConfig(input_column=..., target_column=...) in Python)")


def require_columns(table, columns: Sequence[str], where: str = "the dataset", hint: str = COLUMNS_HINT):
    """Raise DataError naming the columns that exist, and how to choose others, when one of `columns` is missing."""
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise DataError(f"{where} has no column {', '.join(map(repr, missing))}; its columns are "
                        f"{table.column_names}. {hint}")


def seeded_order(n: int, seed: int) -> List[int]:
    """A seeded shuffle of range(n): the one order that cuts splits (splits.split_three) and draws capped
    samples (subset), for lists and datasets alike."""
    import torch

    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def subset(table, data_fraction: float = 1.0, max_samples: Optional[int] = None, seed: int = 0):
    """A reproducible random subset: the first data_fraction of a seeded shuffle (seeded_order), then at most
    max_samples."""
    if not 0.0 < data_fraction <= 1.0:
        raise DataError(f"data_fraction must be in (0, 1], got {data_fraction}")
    if max_samples is not None and max_samples <= 0:
        raise DataError(f"max_samples must be positive, got {max_samples}")
    n = len(table)
    keep = max(1, int(round(n * data_fraction)))
    if max_samples is not None:
        keep = min(keep, max_samples)
    if keep == n:
        return table
    order = seeded_order(n, seed)[:keep]
    return [table[i] for i in order] if isinstance(table, list) else table.select(order)


def as_list(table, column: str) -> List:
    """A column as a Python list (works for `datasets.Dataset` and for a list of dicts)."""
    if isinstance(table, list):
        return [row[column] for row in table]
    return list(table[column])
