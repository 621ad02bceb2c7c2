"""Language modelling: texts concatenated and cut into blocks; perplexity with a sliding window.

Perplexity follows Hugging Face's "Perplexity of fixed-length models" guide: the token stream is scored
by windows of `window` tokens that advance by `stride`; each window scores only the tokens not scored by
an earlier window, with the window's earlier tokens as context. perplexity = exp(total negative
log-likelihood / number of scored tokens), counting the scored tokens exactly. With stride < window every
token but the stream's first is scored exactly once, each with at least window - stride tokens of context
(closer to the model's true perplexity, slower). stride == window gives disjoint chunks (fastest, least
context); each chunk's first token has no context and is not scored, so the result equals the plain
chunked language-modelling loss. The stride is part of the result, because perplexities measured with
different strides are not comparable.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence

import torch

from gpt2lite.errors import DataError
from gpt2lite.loss import IGNORE_INDEX
from gpt2lite.tasks.batching import Examples


def tokenize_stream(texts: Sequence[str], tokenizer, separator: str = "") -> List[int]:
    """All texts as one stream of token ids, joined by `separator`: "" for the lines of a text file that
    kept their line endings (the file's exact text), "\\n\\n" for the rows of a table such as WikiText on
    the hub, as the HF perplexity guide joins them (see tasks.loading.lm_separator)."""
    texts = list(texts)
    for row, text in enumerate(texts):
        if not isinstance(text, str):
            raise DataError(f"row {row} of the text is {str(text)[:40]!r} of type {type(text).__name__}, not a string; "
                            "every row of a language-modelling text column must be text (check the column or "
                            "the file: a JSON number or null, a list?)")
    if not texts:
        raise DataError("no text to tokenize: the dataset is empty")
    ids = tokenizer.encode(separator.join(texts), allow_special=False)
    if len(ids) < 2:
        raise DataError(f"the text has {len(ids)} token(s); language modelling needs at least 2")
    return ids


def build_lm_blocks(texts: Sequence[str], tokenizer, block_size: int, separator: str = "") -> Examples:
    """Training examples {"input_ids", "labels"} of exactly block_size tokens, from the concatenated texts.

    As transformers' run_clm.py, the remainder shorter than a block is dropped (and counted).
    """
    if block_size < 2:
        raise DataError(f"block_size must be at least 2, got {block_size}")
    stream = tokenize_stream(texts, tokenizer, separator)
    n_blocks = len(stream) // block_size
    if n_blocks == 0:
        raise DataError(f"the text has {len(stream)} tokens, fewer than one block of {block_size}; "
                        "use a smaller block_size or more text")
    rows = []
    for b in range(n_blocks):
        block = stream[b * block_size:(b + 1) * block_size]
        rows.append({"input_ids": block, "labels": list(block)})
    return Examples(rows, skipped={"remainder_tokens": len(stream) - n_blocks * block_size})


@dataclass
class Perplexity:
    """The result of a sliding-window evaluation."""

    perplexity: float
    loss: float  # mean negative log-likelihood per scored token (nats)
    scored_tokens: int
    window: int
    stride: int

    def to_dict(self) -> dict:
        return asdict(self)


def windows(n_tokens: int, window: int, stride: int):
    """(begin, end, n_scored) of each window: the scored tokens are the last n_scored of [begin, end)."""
    if window < 2 or not 0 < stride <= window:
        raise ValueError(f"need window >= 2 and 0 < stride <= window, got window={window}, stride={stride}")
    previous_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        # a window's first token has no context inside the window, so it is never scored
        yield begin, end, min(end - previous_end, end - begin - 1)
        previous_end = end
        if end == n_tokens:
            break


@torch.no_grad()
def sliding_window_perplexity(model, token_ids: Sequence[int], window: Optional[int] = None,
                              stride: Optional[int] = None, device=None) -> Perplexity:
    """Perplexity of `model` on one token stream (see the module docstring for the method).

    window: tokens per forward pass (default: the model's context); stride: how far each window advances
    (default: window // 2). The model is called as model(input_ids=(1, T), labels=(1, T)) and returns the
    mean cross-entropy over labelled positions.
    """
    window = window or model.config.n_positions
    stride = stride or max(1, window // 2)
    if window > model.config.n_positions:
        raise ValueError(f"window {window} exceeds the model's context of {model.config.n_positions}")
    device = device if device is not None else next(model.parameters()).device
    ids = torch.as_tensor(list(token_ids), dtype=torch.long)
    if ids.numel() < 2:
        raise DataError("perplexity needs at least 2 tokens")
    was_training = model.training
    model.eval()
    total_nll, total_scored = 0.0, 0
    for begin, end, n_scored in windows(ids.numel(), window, stride):
        input_ids = ids[begin:end].unsqueeze(0).to(device)  # (1, T)
        labels = input_ids.clone()
        labels[:, :-n_scored] = IGNORE_INDEX  # context only
        loss = model(input_ids=input_ids, labels=labels)
        total_nll += float(loss) * n_scored
        total_scored += n_scored
    model.train(was_training)
    mean = total_nll / total_scored
    return Perplexity(perplexity=math.exp(mean), loss=mean, scored_tokens=total_scored, window=window,
                      stride=stride)
