"""The three seed tasks: summarization, language modelling, classification, and how their data is loaded."""

from gpt2lite.errors import DataError
from gpt2lite.tasks.batching import Examples, LengthGroupedSampler, collate
from gpt2lite.tasks.classification import build_classification, check_labels, predict_classes
from gpt2lite.tasks.docstrings import docstring_corpus
from gpt2lite.tasks.language_modeling import Perplexity, build_lm_blocks, sliding_window_perplexity, tokenize_stream
from gpt2lite.tasks.loading import check_json_file, load_table, require_columns, subset
from gpt2lite.tasks.summarization import (DEFAULT_TEMPLATE, build_generation_prompts, build_summarization,
                                         generate_summaries)

__all__ = [
    "DataError", "load_table", "subset", "require_columns", "check_json_file",
    "Examples", "collate", "LengthGroupedSampler",
    "DEFAULT_TEMPLATE", "build_summarization", "build_generation_prompts", "generate_summaries",
    "build_lm_blocks", "tokenize_stream", "sliding_window_perplexity", "Perplexity",
    "build_classification", "check_labels", "predict_classes",
    "docstring_corpus",
]
