"""The three seed tasks, from rows to scores: their data (loading: files and hub tables; splits: DataConfig and
load_splits; docstrings: the offline corpus), their examples (summarization, language_modeling,
classification, batching), their scores (metrics), and build_task, which puts them together (builders)."""

from gpt2lite.errors import DataError
from gpt2lite.tasks.batching import Examples, LengthGroupedSampler, collate
from gpt2lite.tasks.classification import build_classification, check_labels, predict_classes
from gpt2lite.tasks.docstrings import docstring_corpus
from gpt2lite.tasks.language_modeling import Perplexity, build_lm_blocks, sliding_window_perplexity, tokenize_stream
from gpt2lite.tasks.loading import check_json_file, load_table, require_columns, subset
from gpt2lite.tasks.summarization import (DEFAULT_TEMPLATE, build_generation_prompts, build_summarization,
                                         generate_summaries)
from gpt2lite.tasks.splits import DataConfig, TextSplits, load_splits
from gpt2lite.tasks.builders import Task, build_task, generate_texts

__all__ = [
    "DataError", "load_table", "subset", "require_columns", "check_json_file",
    "Examples", "collate", "LengthGroupedSampler",
    "DEFAULT_TEMPLATE", "build_summarization", "build_generation_prompts", "generate_summaries",
    "build_lm_blocks", "tokenize_stream", "sliding_window_perplexity", "Perplexity",
    "build_classification", "check_labels", "predict_classes",
    "docstring_corpus",
    "DataConfig", "TextSplits", "load_splits", "Task", "build_task", "generate_texts",
]
