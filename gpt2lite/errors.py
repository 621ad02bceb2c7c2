"""The library's two error types. Both are ValueErrors whose message names what is wrong and how to fix it.

`CheckpointError` covers every file gpt2lite reads back: Hugging Face checkpoints, training checkpoints
and adapters. `DataError` covers data: files, columns, splits, rows.
"""


class CheckpointError(ValueError):
    """A checkpoint (model, training or adapter) that cannot be loaded: missing, corrupted, or made for
    another model."""


class DataError(ValueError):
    """Data that cannot be used as given; the message says what is wrong and how to fix it."""
