"""Summarization as conditional language modelling: prompt = template around the source, loss on the target.

The template (default "{article}\\nTL;DR: {summary}<|endoftext|>") holds "{article}" (the source text,
whatever its column is called) before "{summary}" (the target text). Its pieces are tokenized apart, so the
prompt's tokens are exactly the prefix of the training sequence, and evaluation prompts are the training
prompts cut before the target. Whitespace that ends the prompt part (the space after "TL;DR:") is moved
to the start of the target, as GPT-2's tokenizer attaches a leading space to the following word.

Fitting the context: the source is truncated (its start kept) so that prompt plus target fit max_length.
When even min_source_tokens of source leave no room, the target is truncated; an example whose target
would be cut away entirely is skipped and counted (Examples.skipped), and the counts are logged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from gpt2lite.errors import DataError
from gpt2lite.loss import IGNORE_INDEX
from gpt2lite.tasks.batching import Examples
from gpt2lite.tasks.loading import as_list, require_columns

logger = logging.getLogger(__name__)

DEFAULT_TEMPLATE = "{article}\nTL;DR: {summary}<|endoftext|>"


@dataclass(frozen=True)
class PromptTemplate:
    """A template split at its placeholders: head + source + middle | target_prefix + target + tail."""

    head: str
    middle: str
    target_prefix: str
    tail: str

    @classmethod
    def parse(cls, template: str) -> "PromptTemplate":
        if template.count("{article}") != 1 or template.count("{summary}") != 1:
            raise DataError(f"the template must hold '{{article}}' and '{{summary}}' once each, got {template!r}")
        head, rest = template.split("{article}")
        if "{summary}" not in rest:
            raise DataError(f"'{{article}}' must come before '{{summary}}' in the template {template!r}")
        middle, tail = rest.split("{summary}")
        stripped = middle.rstrip(" ")
        return cls(head=head, middle=stripped, target_prefix=middle[len(stripped):], tail=tail)


class _Pieces:
    """The template's fixed pieces as token ids."""

    def __init__(self, tokenizer, template: str):
        parsed = PromptTemplate.parse(template)
        self.template = parsed
        self.head = tokenizer.encode(parsed.head) if parsed.head else []
        self.middle = tokenizer.encode(parsed.middle) if parsed.middle else []
        self.tail = tokenizer.encode(parsed.tail) if parsed.tail else []

    @property
    def fixed(self) -> int:
        return len(self.head) + len(self.middle)


def _text(value) -> str:
    return value.strip() if isinstance(value, str) else ""


def build_summarization(table, tokenizer, input_column: str = "article", target_column: str = "highlights",
                        template: str = DEFAULT_TEMPLATE, max_length: int = 1024,
                        max_target_tokens: Optional[int] = None, min_source_tokens: int = 16) -> Examples:
    """Training examples {"input_ids", "labels"}: labels are -100 on every prompt position.

    table: a `datasets.Dataset` (or list of dicts) with input_column and target_column. max_length: the
    model's context (n_positions). max_target_tokens: cap on target tokens (None: no cap).
    Rows with an empty source or target, or whose target cannot fit, are skipped and counted.
    """
    if not isinstance(table, list):
        require_columns(table, [input_column, target_column])
    pieces = _Pieces(tokenizer, template)
    if pieces.fixed + 1 >= max_length:
        raise DataError(f"max_length={max_length} leaves no room after the template's {pieces.fixed} tokens")
    sources, targets = as_list(table, input_column), as_list(table, target_column)
    rows: List[dict] = []
    skipped = {"empty_source": 0, "empty_target": 0, "target_truncated_away": 0}
    truncated = {"source": 0, "target": 0}
    for source_text, target_text in zip(sources, targets):
        source_text, target_text = _text(source_text), _text(target_text)
        if not source_text:
            skipped["empty_source"] += 1
            continue
        if not target_text:
            skipped["empty_target"] += 1
            continue
        source = tokenizer.encode(source_text, allow_special=False)
        target = tokenizer.encode(pieces.template.target_prefix + target_text, allow_special=False) + pieces.tail
        if max_target_tokens is not None and len(target) > max_target_tokens:
            target = target[:max_target_tokens]
            truncated["target"] += 1
        if max_length - pieces.fixed - len(target) < min(min_source_tokens, len(source)):
            room = max_length - pieces.fixed - min(min_source_tokens, len(source))
            if room <= 0:
                skipped["target_truncated_away"] += 1
                continue
            target = target[:room]
            truncated["target"] += 1
        budget = max_length - pieces.fixed - len(target)
        if len(source) > budget:
            source = source[:budget]
            truncated["source"] += 1
        prompt = pieces.head + source + pieces.middle
        rows.append({"input_ids": prompt + target, "labels": [IGNORE_INDEX] * len(prompt) + target})
    _log_counts(len(sources), skipped, truncated, max_length)
    if not rows:
        raise DataError(f"all {len(sources)} examples were skipped ({_describe(skipped)}); check the columns "
                        f"{input_column!r}/{target_column!r} and max_length={max_length}")
    return Examples(rows, skipped, truncated)


def build_generation_prompts(table, tokenizer, input_column: str = "article", target_column: str = "highlights",
                             template: str = DEFAULT_TEMPLATE, max_length: int = 1024,
                             max_new_tokens: int = 64) -> Examples:
    """Evaluation prompts {"input_ids", "reference"}: the training prompt (source truncated so that
    max_new_tokens still fit in max_length) and the target text to score the generation against."""
    if not isinstance(table, list):
        require_columns(table, [input_column, target_column])
    pieces = _Pieces(tokenizer, template)
    budget = max_length - pieces.fixed - max_new_tokens
    if budget <= 0:
        raise DataError(f"max_new_tokens={max_new_tokens} plus the template's {pieces.fixed} tokens leave no "
                        f"room for the source in max_length={max_length}")
    rows, skipped, truncated = [], {"empty_source": 0, "empty_target": 0}, {"source": 0}
    for source_text, target_text in zip(as_list(table, input_column), as_list(table, target_column)):
        source_text, target_text = _text(source_text), _text(target_text)
        if not source_text or not target_text:
            skipped["empty_source" if not source_text else "empty_target"] += 1
            continue
        source = tokenizer.encode(source_text, allow_special=False)
        if len(source) > budget:
            source = source[:budget]
            truncated["source"] += 1
        rows.append({"input_ids": pieces.head + source + pieces.middle, "reference": target_text})
    if not rows:
        raise DataError(f"no usable evaluation example ({_describe(skipped)})")
    return Examples(rows, skipped, truncated)


@torch.no_grad()
def generate_summaries(model, prompts: Examples, tokenizer, max_new_tokens: int = 64, batch_size: int = 8,
                       device=None, temperature: float = 0.0, seed: Optional[int] = None) -> List[str]:
    """Greedy (or sampled) continuations of each prompt, cut at <|endoftext|>, as text."""
    from gpt2lite.generation.decoding import generate
    from gpt2lite.tokenizer import pad_batch

    device = device if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    outputs: List[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = pad_batch([row["input_ids"] for row in prompts.rows[start:start + batch_size]],
                          tokenizer.pad_id, "left")
        new = generate(model, batch["input_ids"].to(device), max_new_tokens,
                       attention_mask=batch["attention_mask"].to(device), temperature=temperature,
                       eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, seed=seed)
        for ids in new.tolist():
            if tokenizer.eos_id in ids:
                ids = ids[:ids.index(tokenizer.eos_id)]
            outputs.append(tokenizer.decode(ids).strip())
    model.train(was_training)
    return outputs


def _describe(counts: Dict[str, int]) -> str:
    return ", ".join(f"{name}: {n}" for name, n in counts.items() if n) or "none"


def _log_counts(total: int, skipped: Dict[str, int], truncated: Dict[str, int], max_length: int):
    if any(skipped.values()):
        logger.warning("summarization: skipped %d of %d examples (%s); max_length=%d",
                       sum(skipped.values()), total, _describe(skipped), max_length)
    if truncated.get("target"):
        logger.warning("summarization: truncated the target of %d examples to fit max_length=%d",
                       truncated["target"], max_length)
    if truncated.get("source"):
        logger.info("summarization: truncated the source of %d of %d examples to fit max_length=%d",
                    truncated["source"], total, max_length)
