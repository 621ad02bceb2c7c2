"""Task builders: a TextSplits becomes tokenized train / validation examples and a test-split scorer.

    task = build_task(data, splits, tokenizer, context)   # DataConfig.task picks one of the three below
    task.train, task.validation                           # Examples for train()
    scores, predictions = task.evaluate(model)            # on the test split

summarization_task: the loss on the summary only; ROUGE/BLEU/... of generated test summaries.
language_modeling_task: blocks of tokens; sliding-window perplexity and continuation scores on the test texts.
classification_task: class ids; accuracy and weighted precision / recall / F1.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from gpt2lite.errors import DataError
from gpt2lite.tasks.batching import Examples
from gpt2lite.tasks.classification import build_classification, check_labels, predict_classes
from gpt2lite.tasks.language_modeling import build_lm_blocks, sliding_window_perplexity, tokenize_stream
from gpt2lite.tasks.loading import as_list, require_columns, subset
from gpt2lite.tasks.splits import DataConfig, TextSplits, column_values
from gpt2lite.tasks.summarization import DEFAULT_TEMPLATE, build_generation_prompts, build_summarization

logger = logging.getLogger(__name__)


@dataclass
class Task:
    """Tokenized training and validation examples, and `evaluate(model) -> (scores, predictions)`, scored
    on the test split; predictions are {"source", "reference", "prediction"} rows (none for perplexity)."""

    kind: str  # "summarization" | "classification" | "language_modeling"
    train: Examples
    validation: Examples
    evaluate: Callable[[torch.nn.Module], Tuple[dict, List[dict]]]
    test_size: int = 0  # test examples scored (LM: texts continued)


def virtual_positions(method) -> int:
    """Context positions a method's virtual tokens (prompt tuning, prefixes) take from every example."""
    from gpt2lite.peft import MethodConfig

    if method is None:
        return 0
    method = MethodConfig.from_value(method)
    return method.n_tokens if method.name in ("prompt", "prefix") else 0


def build_task(data: DataConfig, splits: TextSplits, tokenizer, context: int, generation=None) -> Task:
    """The task `data.task` on `splits`, its examples cut to min(data.max_length, context) tokens.
    context: the model's n_positions less the virtual tokens of the methods that will run (virtual_positions).
    generation: a GenerationConfig for the test generations (default: GenerationConfig())."""
    from gpt2lite.generation.decoding import GenerationConfig

    generation = generation or GenerationConfig()
    max_length = min(data.max_length or context, context)
    if data.task == "summarization":
        return summarization_task(data, splits, tokenizer, max_length, generation)
    if data.task == "language_modeling":
        return language_modeling_task(data, splits, tokenizer, max_length, generation)
    return classification_task(data, splits, tokenizer, max_length, data.num_labels or infer_num_labels(splits))


def infer_num_labels(splits: TextSplits) -> int:
    """1 + the largest class id of the train split (whose labels are checked on the way)."""
    return 1 + max(check_labels(as_list(splits.train, splits.target_column)))


def _rows(table) -> List[dict]:
    return table if isinstance(table, list) else table.to_list()


def _capped(table, cap: Optional[int], seed: int):
    return subset(table, 1.0, cap, seed)


def _templated(table, column: str, template: Optional[str]):
    """The table with `column` put through a "{text}" template (the table itself when template is None)."""
    if template is None:
        return table
    if template.count("{text}") != 1:
        raise DataError(f"data.template must hold '{{text}}' once for this task, got {template!r}")
    if not isinstance(table, list):
        require_columns(table, [column])
    return [{**row, column: template.replace("{text}", row[column] if isinstance(row[column], str) else "")}
            for row in _rows(table)]


def summarization_task(data: DataConfig, splits: TextSplits, tokenizer, max_length: int, generation) -> Task:
    """Summarization examples (loss on the summary only) and ROUGE/BLEU/... of generated test summaries."""
    from gpt2lite.tasks.metrics import generation_metrics

    source, target = splits.input_column, splits.target_column
    columns = dict(input_column=source, target_column=target, template=data.template or DEFAULT_TEMPLATE)
    train = build_summarization(_capped(splits.train, data.max_train_samples, data.seed), tokenizer,
                                max_length=max_length, **columns)
    validation = build_summarization(_capped(splits.validation, data.max_validation_samples, data.seed), tokenizer,
                                     max_length=max_length, **columns)
    test = _capped(splits.test, data.max_test_samples, data.seed)
    if not isinstance(test, list):
        require_columns(test, [source, target], "the test split")
    usable = [row for row in _rows(test) if all(isinstance(row[c], str) and row[c].strip() for c in (source, target))]
    prompts = build_generation_prompts(usable, tokenizer, max_length=max_length,
                                       max_new_tokens=generation.max_new_tokens, **columns)

    def evaluate(model):
        texts = generate_texts(model, [row["input_ids"] for row in prompts.rows], tokenizer, generation)
        references = [row["reference"] for row in prompts.rows]
        predictions = [{"source": row[source], "reference": reference, "prediction": text}
                       for row, reference, text in zip(usable, references, texts)]
        return generation_metrics(texts, references), predictions

    return Task("summarization", train, validation, evaluate, len(prompts))


def language_modeling_task(data: DataConfig, splits: TextSplits, tokenizer, max_length: int, generation) -> Task:
    """Blocks of max_length tokens for training and validation loss; on the test texts (the first
    data.max_test_samples rows, joined as splits.separator says: a text file's exact text, a table's rows
    with "\n\n") a sliding-window perplexity (stride data.stride, default max_length // 2) and
    the generation scores of each text's last max_new_tokens tokens continued from the text before them."""
    from gpt2lite.tasks.metrics import generation_metrics

    column = splits.input_column
    train_texts, validation_texts, test_texts = (
        column_values(_templated(table, column, data.template), column) for table in (splits.train, splits.validation,
                                                                                 splits.test))
    train = build_lm_blocks(train_texts, tokenizer, max_length, splits.separator("train"))
    validation = build_lm_blocks(validation_texts, tokenizer, max_length, splits.separator("validation"))
    if data.max_train_samples is not None:
        train.rows = subset(train.rows, 1.0, data.max_train_samples, data.seed)
    if data.max_validation_samples is not None:
        validation.rows = validation.rows[:data.max_validation_samples]
    test_texts = test_texts[:data.max_test_samples]
    stream = tokenize_stream(test_texts, tokenizer, splits.separator("test"))  # the file's text, or the rows + "\n\n"
    stride = data.stride or max(1, max_length // 2)
    if stride > max_length:
        raise DataError(f"data.stride={stride} exceeds the perplexity window of {max_length} tokens (data.max_length "
                        "or the model's context); use a stride <= the window")
    continuations = _continuations(test_texts, tokenizer, max_length, generation.max_new_tokens)

    def evaluate(model):
        result = sliding_window_perplexity(model, stream, window=max_length, stride=stride)
        scores = {"perplexity": result.perplexity, "perplexity_loss": result.loss,
                  "perplexity_stride": result.stride, "perplexity_window": result.window,
                  "perplexity_tokens": result.scored_tokens}
        if not continuations:
            return scores, []
        texts = generate_texts(model, [prompt for prompt, _ in continuations], tokenizer, generation)
        references = [reference for _, reference in continuations]
        predictions = [{"source": tokenizer.decode(prompt), "reference": reference, "prediction": text}
                       for (prompt, reference), text in zip(continuations, texts)]
        return {**scores, **generation_metrics(texts, references)}, predictions

    return Task("language_modeling", train, validation, evaluate, len(continuations))


def _continuations(texts, tokenizer, max_length: int, max_new_tokens: int) -> List[Tuple[List[int], str]]:
    """(prompt ids, reference text) of each text with at least 2 x max_new_tokens tokens: the reference is
    its last max_new_tokens tokens, the prompt the (at most max_length - max_new_tokens) tokens before."""
    pairs = []
    for text in texts:
        ids = tokenizer.encode(text, allow_special=False) if isinstance(text, str) else []
        if len(ids) >= 2 * max_new_tokens and max_length > max_new_tokens:
            prompt = ids[:-max_new_tokens][-(max_length - max_new_tokens):]
            pairs.append((prompt, tokenizer.decode(ids[-max_new_tokens:]).strip()))
    if not pairs:
        logger.warning("language modelling: no test text has %d tokens to continue; no generation scores",
                       2 * max_new_tokens)
    return pairs


def classification_task(data: DataConfig, splits: TextSplits, tokenizer, max_length: int, num_labels: int) -> Task:
    """Classification examples, and accuracy / weighted P, R, F1 on the test split."""
    from gpt2lite.tasks.metrics import classification_metrics

    text, label = splits.input_column, splits.target_column
    columns = dict(input_column=text, label_column=label, num_labels=num_labels, max_length=max_length)
    train, validation, test = (
        build_classification(_templated(_capped(table, cap, data.seed), text, data.template), tokenizer, **columns)
        for table, cap in ((splits.train, data.max_train_samples), (splits.validation, data.max_validation_samples),
                           (splits.test, data.max_test_samples)))

    def evaluate(model):
        predicted, true = predict_classes(model, test, pad_id=tokenizer.pad_id)
        predictions = [{"source": tokenizer.decode(row["input_ids"]), "reference": int(t), "prediction": int(p)}
                       for row, p, t in zip(test.rows, predicted, true)]
        return classification_metrics(true, predicted, num_labels), predictions

    return Task("classification", train, validation, evaluate, len(test))


@torch.no_grad()
def generate_texts(model, prompts: Sequence[Sequence[int]], tokenizer, generation, batch_size: int = 8) -> List[str]:
    """The continuation of each prompt (token ids) as text, cut at eos, in batches of left-padded prompts."""
    from gpt2lite.generation.decoding import generate
    from gpt2lite.tokenizer import pad_batch

    device = next(model.parameters()).device
    texts = []
    for start in range(0, len(prompts), batch_size):
        batch = pad_batch(prompts[start:start + batch_size], tokenizer.pad_id, "left")
        new = generate(model, batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                       config=generation, tokenizer=tokenizer)
        for ids in new.tolist():
            if generation.eos_id is not None and generation.eos_id in ids:
                ids = ids[:ids.index(generation.eos_id)]
            texts.append(tokenizer.decode(ids).strip())
    return texts
