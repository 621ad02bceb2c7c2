"""One fine-tuning method on one task, end to end: base model, method, training, evaluation, report row.

The examples are built from these steps:

    base = load_base_model("gpt2")                     # pretrained, or a loud random-init fallback
    task = summarization_task(splits, tokenizer, ...)  # tokenized examples + how to score a model
    row, model, summary = run_method("lora", {"name": "lora", "rank": 8}, base, task, TrainConfig(...))
    write_report([row, ...], output_dir, task.kind, random_init=base.random_init)

The fallbacks never hide: when pretrained weights or the hub dataset cannot be had, the returned objects
say so in `description`, `random_init` / `fallback` are set, and a warning is logged.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from .config import GPT2Config
from .model import GPT2, GPT2ForSequenceClassification, count_parameters
from .tasks import (DataError, Examples, LengthGroupedSampler, build_classification, build_generation_prompts,
                    build_lm_blocks, build_summarization, docstring_corpus, generate_summaries, load_table,
                    predict_classes, sliding_window_perplexity, subset, tokenize_stream)
from .tasks.loading import as_list, hub_reachable, require_columns

logger = logging.getLogger(__name__)


@dataclass
class BaseModel:
    """The model every method starts from (each run works on its own deep copy).

    kind: "pretrained" (the requested weights), "offline-pretrained" (no pretrained GPT-2 could be loaded;
    a small model pretrained here on the standard library's docstrings, see gpt2lite.pretrain) or
    "random" (randomly initialised: quality figures mean nothing).
    """

    model: torch.nn.Module
    description: str
    kind: str = "pretrained"

    @property
    def random_init(self) -> bool:
        return self.kind == "random"


def load_base_model(name_or_path: str = "gpt2", num_labels: Optional[int] = None, fallback_preset: str = "tiny",
                    allow_random_init: bool = True, seed: int = 0,
                    fallback_pretrain: Optional["PretrainConfig"] = None) -> BaseModel:
    """Pretrained weights from a local directory or the hub. Where they cannot be had (offline): with
    fallback_pretrain, a small model pretrained offline per those settings (gpt2lite.pretrain; cached, so
    only the first run pays for it); otherwise a randomly initialised `fallback_preset` model. Either way
    the description says plainly that it is not GPT-2.
    num_labels: build a GPT2ForSequenceClassification (a new, random score head on the pretrained body)."""
    from .hf import CheckpointError

    cls = GPT2ForSequenceClassification if num_labels else GPT2
    kwargs = {"num_labels": num_labels} if num_labels else {}
    local = os.path.isdir(name_or_path)
    if local or hub_reachable():
        try:
            model = cls.from_pretrained(name_or_path, **kwargs)
            return BaseModel(model, f"pretrained weights: {name_or_path}", kind="pretrained")
        except CheckpointError as error:
            if local or not allow_random_init:
                raise
            reason = str(error).splitlines()[0]
    else:
        reason = "the Hugging Face Hub is unreachable"
    if not allow_random_init:
        raise CheckpointError(f"could not load {name_or_path!r}: {reason}")
    if fallback_pretrain is not None:
        return _offline_pretrained(cls, kwargs, fallback_pretrain, name_or_path, reason)
    config = GPT2Config.from_name(fallback_preset, pad_token_id=50256)
    torch.manual_seed(seed)
    model = cls(config, **kwargs)
    _, total = count_parameters(model)
    description = (f"RANDOMLY INITIALISED '{fallback_preset}' model ({config.n_layer} layers, n_embd={config.n_embd}, "
                   f"context {config.n_positions}, {total / 1e6:.1f}M parameters), NOT GPT-2: could not load "
                   f"{name_or_path!r} ({reason}). Quality numbers are not meaningful; efficiency numbers are real.")
    logger.warning(description)
    return BaseModel(model, description, kind="random")


def _offline_pretrained(cls, kwargs: dict, settings, name_or_path: str, reason: str) -> BaseModel:
    """The offline fallback with a pretrained small model (gpt2lite.pretrain), described as what it is."""
    from .pretrain import load_or_pretrain

    logger.warning("could not load %r (%s): using a small model pretrained offline instead (the first run "
                   "pretrains it, a few minutes; later runs load it from the cache)", name_or_path, reason)
    _, metadata = load_or_pretrain(settings)
    model = cls.from_pretrained(metadata["directory"], **kwargs)
    config = model.config
    _, total = count_parameters(model)
    origin = "loaded from the cache" if metadata["from_cache"] else f"pretrained now in {metadata['pretrain_seconds']:.0f}s"
    description = (
        f"SMALL OFFLINE-PRETRAINED '{settings.preset}' model, NOT GPT-2 ({config.n_layer} layers, n_embd="
        f"{config.n_embd}, context {config.n_positions}, {total / 1e6:.1f}M parameters, GPT-2's tokenizer): could "
        f"not load {name_or_path!r} ({reason}), so it was pretrained for {settings.steps} steps "
        f"({metadata['trained_tokens'] / 1e6:.1f}M tokens) on the Python standard library's docstrings and comments "
        f"(held-out loss {metadata['heldout_loss_full_vocab']:.2f}; {origin}: {metadata['directory']}). The "
        "summarization task's validation and test docstrings were left out of that corpus. Quality figures show "
        "that the methods work; they are not GPT-2 results.")
    logger.warning(description)
    return BaseModel(model, description, kind="offline-pretrained")


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
                         seed: int = 0) -> TextSplits:
    """Local files (one file: 10% held out for validation and test), else the hub dataset, else the
    standard library's docstring corpus (see tasks.docstrings; at most fallback_examples examples, all
    ~2,000 by default), with a description that says which."""
    if data_files is not None:
        files = data_files if isinstance(data_files, dict) else {"train": data_files}
        train = load_table(data_files=files, split="train")
        if "validation" in files:
            validation = load_table(data_files=files, split="validation")
        else:
            train, validation = _split_off(train, 0.1, seed)
        test = load_table(data_files=files, split="test") if "test" in files else validation
        return TextSplits(train, validation, test, source_column, target_column,
                          f"local files: {files}")
    try:
        tables = [load_table(dataset, config_name, split=s) for s in ("train", "validation", "test")]
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


@dataclass
class Task:
    """Tokenized training and validation examples, and `evaluate(model) -> quality scores`."""

    kind: str  # "summarization" | "classification" | "language_modeling"
    train: Examples
    validation: Examples
    evaluate: Callable[[torch.nn.Module], dict]


def summarization_task(splits: TextSplits, tokenizer, max_length: int, data_fraction: float = 1.0,
                       max_train_samples: Optional[int] = None, max_eval_samples: Optional[int] = 200,
                       eval_generate_samples: int = 50, max_new_tokens: int = 48, template: Optional[str] = None,
                       seed: int = 0) -> Task:
    """Summarization examples (loss on the summary only) and a ROUGE/BLEU/... evaluation by greedy
    generation on eval_generate_samples test examples. max_length: the context left for real tokens
    (n_positions minus any soft-prompt tokens)."""
    from .metrics import generation_metrics
    from .tasks.summarization import DEFAULT_TEMPLATE

    template = template or DEFAULT_TEMPLATE
    columns = dict(source_column=splits.source_column, target_column=splits.target_column, template=template)
    train = build_summarization(subset(splits.train, data_fraction, max_train_samples, seed), tokenizer,
                                max_length=max_length, **columns)
    validation = build_summarization(subset(splits.validation, 1.0, max_eval_samples, seed), tokenizer,
                                     max_length=max_length, **columns)
    prompts = build_generation_prompts(subset(splits.test, 1.0, eval_generate_samples, seed), tokenizer,
                                       max_length=max_length, max_new_tokens=max_new_tokens, **columns)

    def evaluate(model):
        predictions = generate_summaries(model, prompts, tokenizer, max_new_tokens=max_new_tokens)
        return generation_metrics(predictions, [row["reference"] for row in prompts.rows])

    return Task("summarization", train, validation, evaluate)


def lm_texts(dataset: Optional[str] = "wikitext", config_name: Optional[str] = "wikitext-2-raw-v1",
             data_files=None, text_column: str = "text", allow_fallback: bool = True,
             fallback_examples: Optional[int] = None) -> TextSplits:
    """Texts for language modelling: local files ({"train": ..., "validation": ...}, or one file of which
    10% is held out), the hub dataset, or else the docstring corpus (sources and summaries as text)."""
    if data_files is not None or dataset is not None:
        try:
            splits = summarization_splits(dataset, config_name, data_files, text_column, text_column,
                                          allow_fallback=False)
            texts = [_column(table, text_column) for table in (splits.train, splits.validation, splits.test)]
            return TextSplits(*texts, text_column, text_column, splits.description)
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


def _column(table, column: str) -> list:
    if not isinstance(table, list):
        require_columns(table, [column])
    return as_list(table, column)


def language_modeling_task(splits: TextSplits, tokenizer, block_size: int, stride: Optional[int] = None,
                           max_train_blocks: Optional[int] = None, max_eval_blocks: Optional[int] = 50,
                           seed: int = 0) -> Task:
    """Blocks of block_size tokens for training and validation loss, and a sliding-window perplexity
    (window block_size, the given stride, default block_size // 2) over the validation stream."""
    train = build_lm_blocks(splits.train, tokenizer, block_size)
    validation = build_lm_blocks(splits.validation, tokenizer, block_size)
    if max_train_blocks is not None:
        train.rows = subset(train.rows, 1.0, max_train_blocks, seed)
    if max_eval_blocks is not None:
        validation.rows = validation.rows[:max_eval_blocks]
    stream = tokenize_stream(splits.validation, tokenizer)[:block_size * (max_eval_blocks or 10**9)]
    stride = stride or max(1, block_size // 2)

    def evaluate(model):
        result = sliding_window_perplexity(model, stream, window=block_size, stride=stride)
        return {"perplexity": result.perplexity, "perplexity_loss": result.loss,
                "perplexity_stride": result.stride, "perplexity_window": result.window,
                "perplexity_tokens": result.scored_tokens}

    return Task("language_modeling", train, validation, evaluate)


def classification_task(train_table, validation_table, tokenizer, num_labels: int, max_length: int = 128,
                        text_column: str = "text", label_column: str = "label", data_fraction: float = 1.0,
                        max_train_samples: Optional[int] = None, max_eval_samples: Optional[int] = None,
                        seed: int = 0) -> Task:
    """Classification examples and an accuracy / weighted P, R, F1 evaluation on the validation set."""
    from .metrics import classification_metrics

    columns = dict(text_column=text_column, label_column=label_column, num_labels=num_labels, max_length=max_length)
    train = build_classification(subset(train_table, data_fraction, max_train_samples, seed), tokenizer, **columns)
    validation = build_classification(subset(validation_table, 1.0, max_eval_samples, seed), tokenizer, **columns)

    def evaluate(model):
        predicted, true = predict_classes(model, validation, pad_id=tokenizer.pad_id)
        return classification_metrics(true, predicted, num_labels)

    return Task("classification", train, validation, evaluate)


def reset_peak_rss() -> bool:
    """Reset the process's peak resident set size (Linux: VmHWM through /proc/self/clear_refs), so that a
    method run after another in the same process reports its own peak; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> Optional[float]:
    """VmHWM (peak resident set size since the last reset) in MB, or None where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def run_method(label: str, method: Union["MethodConfig", dict, str, None], base: BaseModel, task: Task, train_config,
               sampler_seed: int = 0):
    """Train a deep copy of the base model with `method` (None: no fine-tuning, evaluation only) in
    train_config.output_dir; return (report row, trained model, train() summary)."""
    from .peft import MethodConfig, apply
    from .report import method_row
    from .train import evaluate_loss, train

    model = copy.deepcopy(base.model)
    per_method_rss = not torch.cuda.is_available() and reset_peak_rss()
    if method is None:
        from .tasks.batching import collate

        for p in model.parameters():
            p.requires_grad_(False)
        model.to(train_config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        val_loss = evaluate_loss(model, task.validation, collate, train_config.eval_batch_size or train_config.batch_size)
        summary = {"best_val_loss": val_loss, "trainable_params": 0, "wall_time_s": 0.0,
                   "peak_memory_mb": peak_rss_mb() if per_method_rss else None}
    else:
        apply(model, MethodConfig.from_value(method))
        sampler = LengthGroupedSampler(task.train.lengths(), train_config.batch_size * train_config.grad_accum,
                                       seed=sampler_seed)
        summary = train(model, task.train, train_config, eval_dataset=task.validation, sampler=sampler)
        if per_method_rss and peak_rss_mb() is not None:
            summary["peak_memory_mb"] = peak_rss_mb()  # this method's peak, not the whole process's
    quality = task.evaluate(model)
    return method_row(label, summary, model, quality, random_init=base.random_init, base_kind=base.kind), model, summary
