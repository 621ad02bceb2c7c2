"""One fine-tuning method on one task, end to end: base model, method, training, evaluation, report row.

The command line (gpt2lite.cli) is built from these steps:

    base = load_base_model("gpt2")                          # pretrained, or a loud random-init fallback
    splits = load_splits(DataConfig(train="my.jsonl"))      # gpt2lite.data: three disjoint splits
    task = build_task(data, splits, tokenizer, context)     # tokenized examples + how to score a model
    result = run_method("lora", {"name": "lora", "rank": 8}, base, task, TrainConfig(...))
    write_report([result.row, ...], output_dir, task.kind, random_init=base.random_init)

The fallbacks never hide: when pretrained weights or the hub dataset cannot be had, the returned objects
say so in `description`, `random_init` / `fallback` are set, and a warning is logged.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .config import GPT2Config
from .data import DataConfig
from .model import GPT2, GPT2ForSequenceClassification, count_parameters
from .tasks import (DEFAULT_TEMPLATE, DataError, Examples, LengthGroupedSampler, build_classification,
                    build_generation_prompts, build_lm_blocks, build_summarization, check_labels, docstring_corpus,
                    load_table, predict_classes, sliding_window_perplexity, subset, tokenize_stream)
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
                         seed: int = 0, max_rows: Optional[Dict[str, Optional[int]]] = None) -> TextSplits:
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


@dataclass
class Task:
    """Tokenized training and validation examples, and `evaluate(model) -> (scores, predictions)`, scored
    on the test split; predictions are {"source", "reference", "prediction"} rows (none for perplexity)."""

    kind: str  # "summarization" | "classification" | "language_modeling"
    train: Examples
    validation: Examples
    evaluate: Callable[[torch.nn.Module], Tuple[dict, List[dict]]]
    test_size: int = 0  # test examples scored (LM: texts continued)


def virtual_tokens(method) -> int:
    """Context positions a method's virtual tokens (prompt tuning, prefixes) take from every example."""
    from .peft import MethodConfig

    if method is None:
        return 0
    method = MethodConfig.from_value(method)
    return method.n_tokens if method.name in ("prompt", "prefix") else 0


def build_task(data: DataConfig, splits: TextSplits, tokenizer, context: int, generation=None) -> Task:
    """The task `data.task` on `splits`, its examples cut to min(data.max_length, context) tokens.
    context: the model's n_positions less the virtual tokens of the methods that will run (virtual_tokens).
    generation: a GenerationConfig for the test generations (default: GenerationConfig())."""
    from .generate import GenerationConfig

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
    from .metrics import generation_metrics

    source, target = splits.source_column, splits.target_column
    columns = dict(source_column=source, target_column=target, template=data.template or DEFAULT_TEMPLATE)
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
    data.max_test_samples) a sliding-window perplexity (stride data.stride, default max_length // 2) and
    the generation scores of each text's last max_new_tokens tokens continued from the text before them."""
    from .metrics import generation_metrics

    column = splits.source_column
    train_texts, validation_texts, test_texts = (
        _column(_templated(table, column, data.template), column) for table in (splits.train, splits.validation,
                                                                                 splits.test))
    train = build_lm_blocks(train_texts, tokenizer, max_length)
    validation = build_lm_blocks(validation_texts, tokenizer, max_length)
    if data.max_train_samples is not None:
        train.rows = subset(train.rows, 1.0, data.max_train_samples, data.seed)
    if data.max_validation_samples is not None:
        validation.rows = validation.rows[:data.max_validation_samples]
    test_texts = test_texts[:data.max_test_samples]
    stream = tokenize_stream(test_texts, tokenizer)
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
    from .metrics import classification_metrics

    text, label = splits.source_column, splits.target_column
    columns = dict(text_column=text, label_column=label, num_labels=num_labels, max_length=max_length)
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
    from .generate import generate
    from .tokenizer import pad_batch

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


@dataclass
class MethodResult:
    """What run_method returns: the report row, the trained model, train()'s summary, the test predictions."""

    row: dict
    model: torch.nn.Module
    summary: dict
    predictions: List[dict] = field(default_factory=list)


def run_method(label: str, method: Union["MethodConfig", dict, str, None], base: BaseModel, task: Task, train_config,
               sampler_seed: int = 0, evaluate: bool = True) -> MethodResult:
    """Train a deep copy of the base model with `method` (None: no fine-tuning, evaluation only) in
    train_config.output_dir, then score it on the test split (evaluate=False: the row has no quality)."""
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
        if summary.get("best_val_loss") is None:  # stopped before any evaluation: the final model's loss
            from .tasks.batching import collate

            summary["best_val_loss"] = evaluate_loss(model, task.validation, collate,
                                                     train_config.eval_batch_size or train_config.batch_size)
        if per_method_rss and peak_rss_mb() is not None:
            summary["peak_memory_mb"] = peak_rss_mb()  # this method's peak, not the whole process's
    quality, predictions = task.evaluate(model) if evaluate else ({}, [])
    row = method_row(label, summary, model, quality, random_init=base.random_init, base_kind=base.kind)
    return MethodResult(row, model, summary, predictions)
