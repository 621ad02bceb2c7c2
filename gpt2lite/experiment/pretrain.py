"""A small GPT-2 pretrained offline, for when no pretrained GPT-2 can be loaded (the offline demo).

Parameter-efficient methods adapt what a base model already knows: on a randomly initialised model, LoRA
and prompt tuning have nothing to adapt and the demo would teach that they do nothing. So where GPT-2
cannot be downloaded, the demo first pretrains a small GPT-2 (the "demo" preset: GPT-2's architecture,
tokenizer and 50,257-token vocabulary) on text that every Python installation carries:
`tasks.docstrings.pretraining_texts`, the standard library's docstrings and comments, without the
summarization corpus's validation and test examples.

    model, metadata = load_or_pretrain(PretrainConfig(steps=450))  # ~2.5 min on 2 cores, then cached

One trick keeps this to a few minutes on two cores. The LM head (n_embd x 50,257) is most of a small
model's compute, but the corpus uses only ~15,000 distinct tokens; during pretraining the softmax runs
over those alone (`corpus_vocab_head`). The embedding rows of tokens the corpus never holds get no
training; they are then set to the mean of the rarest trained rows, so that the ordinary full softmax
gives them the low scores of rare tokens (metadata["heldout_loss_full_vocab"] against
metadata["heldout_loss_corpus_vocab"] shows what that costs).

The result is cached in cache_root()/offline-base/<key>/: config.json and model.safetensors (a Hugging
Face checkpoint) and metadata.json. key hashes the corpus text, the model config and the pretraining
settings, so a change in any of them trains a new model; the directory is written under a temporary
name and renamed into place, so a crash never leaves a half-written cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from gpt2lite.model.config import GPT2Config
from gpt2lite.kernels.loss import linear_cross_entropy
from gpt2lite.model.gpt2 import GPT2
from gpt2lite.training.optim import adamw, lr_factor, parameter_groups

logger = logging.getLogger(__name__)

CORPUS_VERSION = 1  # bump when tasks.docstrings.pretraining_texts changes what it extracts


@dataclass(frozen=True)
class PretrainConfig:
    """What to pretrain, on what, for how long. Every field is part of the cache key."""

    preset: str = "demo"  # GPT2Config preset; its n_positions is the training block length
    steps: int = 450  # optimizer steps
    batch_size: int = 16  # blocks of n_positions tokens per step
    lr: float = 3e-3  # peak; warmup, then cosine decay to 0
    warmup_steps: int = 30
    weight_decay: float = 0.0
    corpus_vocab_head: bool = True  # softmax over the corpus's tokens only while pretraining
    comments: bool = True  # the standard library's comment blocks beside its docstrings
    packages: Tuple[str, ...] = ()  # installed top-level packages whose docstrings join the corpus
    heldout_fraction: float = 0.02  # the stream's tail, never trained on, scored at the end
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"PretrainConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.lr <= 0 or self.warmup_steps < 0 or self.weight_decay < 0:
            raise ValueError("PretrainConfig: lr must be > 0, warmup_steps and weight_decay >= 0")
        if not 0 < self.heldout_fraction < 0.5:
            raise ValueError(f"PretrainConfig.heldout_fraction must be in (0, 0.5), got {self.heldout_fraction}")
        object.__setattr__(self, "packages", tuple(self.packages))


def cache_root() -> str:
    """$GPT2LITE_CACHE, else $XDG_CACHE_HOME/gpt2lite, else ~/.cache/gpt2lite."""
    if os.environ.get("GPT2LITE_CACHE"):
        return os.environ["GPT2LITE_CACHE"]
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "gpt2lite")


def cache_key(corpus_sha256: str, model_config: GPT2Config, settings: PretrainConfig) -> str:
    """A hash of everything the pretrained weights depend on (torch's own numerics aside)."""
    record = {"corpus_sha256": corpus_sha256, "corpus_version": CORPUS_VERSION,
              "model_config": dataclasses.asdict(model_config), "settings": dataclasses.asdict(settings)}
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:16]


def token_stream(texts: List[str], tokenizer) -> torch.Tensor:
    """The documents as one stream of token ids (1-D), each followed by <|endoftext|>."""
    stream: List[int] = []
    for text in texts:
        stream.extend(tokenizer.encode(text, allow_special=False))
        stream.append(tokenizer.eos_id)
    return torch.tensor(stream)


def pretrain(model: GPT2, stream: torch.Tensor, settings: PretrainConfig, vocab: Optional[torch.Tensor] = None,
             on_step=None) -> List[float]:
    """Train `model` in place on random blocks of `stream` (1-D token ids); return the loss of each step.

    vocab: sorted token ids the softmax runs over (None: all of them); every id in stream must be in it.
    on_step(step, loss): called after each optimizer step.
    """
    block = model.config.n_positions
    if stream.numel() <= block:
        raise ValueError(f"the corpus has {stream.numel()} tokens, fewer than one block of {block} + 1")
    targets = stream if vocab is None else torch.searchsorted(vocab, stream)  # ids -> rows of the head
    generator = torch.Generator().manual_seed(settings.seed)
    optimizer = adamw(parameter_groups(model, settings.weight_decay), lr=settings.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, settings.warmup_steps, settings.steps, "cosine"))
    model.train()
    losses = []
    for step in range(settings.steps):
        starts = torch.randint(0, stream.numel() - block, (settings.batch_size,), generator=generator)
        rows = starts[:, None] + torch.arange(block + 1)  # (B, block + 1)
        loss = block_loss(model, stream[rows[:, :-1]], targets[rows[:, 1:]], vocab)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step + 1, losses[-1])
    model.eval()
    return losses


def block_loss(model: GPT2, inputs: torch.Tensor, targets: torch.Tensor, vocab: Optional[torch.Tensor] = None):
    """Mean next-token cross-entropy; inputs (B, T) token ids, targets (B, T) the next tokens, as rows of
    vocab when it is given (the softmax then runs over vocab's tokens only)."""
    hidden = model.transformer(inputs)  # (B, T, C)
    weight = model.lm_head.weight if vocab is None else model.lm_head.weight[vocab]  # (V', C)
    return linear_cross_entropy(hidden.flatten(0, 1), weight, None, targets.flatten(), scale=1.0 / targets.numel())


def fill_untrained_rows(model: GPT2, vocab: torch.Tensor, counts: torch.Tensor, rarest: int = 1000):
    """Set the embedding (= LM head) rows of the tokens outside vocab to the mean of the `rarest` trained
    rows (counts: each vocab token's count in the corpus), which training has pushed to low scores."""
    weight = model.transformer.wte.weight
    with torch.no_grad():
        rare = vocab[torch.argsort(counts, stable=True)[:rarest]]
        untrained = torch.ones(weight.size(0), dtype=torch.bool)
        untrained[vocab] = False
        weight[untrained] = weight[rare].mean(0)


@torch.no_grad()
def heldout_loss(model: GPT2, stream: torch.Tensor, vocab: Optional[torch.Tensor] = None, max_blocks: int = 32):
    """Mean next-token loss over consecutive blocks of stream (the full softmax, or over vocab)."""
    block = model.config.n_positions
    n_blocks = min(max_blocks, (stream.numel() - 1) // block)
    if n_blocks == 0:
        return float("nan")
    inputs = stream[:n_blocks * block].view(n_blocks, block)
    following = stream[1:n_blocks * block + 1].view(n_blocks, block)
    targets = following if vocab is None else torch.searchsorted(vocab, following)
    return block_loss(model, inputs, targets, vocab).item()


def load_or_pretrain(settings: Optional[PretrainConfig] = None, cache_dir: Optional[str] = None,
                     texts: Optional[List[str]] = None, on_step=None) -> Tuple[GPT2, dict]:
    """The small pretrained model and its metadata: from the cache when one was made with the same corpus,
    config and settings (metadata["from_cache"] is then True), else pretrained now and cached.

    cache_dir: where the model directories live (default cache_root()/offline-base).
    texts: the documents to pretrain on (default tasks.docstrings.pretraining_texts per settings).
    on_step(step, loss): progress of a pretraining run.
    """
    from gpt2lite.tokenizer import Tokenizer

    settings = settings or PretrainConfig()
    config = GPT2Config.from_name(settings.preset)
    tokenizer = Tokenizer()
    if texts is None:
        from gpt2lite.tasks.docstrings import pretraining_texts

        texts = pretraining_texts(comments=settings.comments, packages=settings.packages)
    corpus_sha256 = hashlib.sha256("\0".join(texts).encode()).hexdigest()
    key = cache_key(corpus_sha256, config, settings)
    directory = os.path.join(cache_dir or os.path.join(cache_root(), "offline-base"), key)
    metadata = read_cached(directory, key)
    if metadata is not None:
        logger.info("offline base model: reusing %s", directory)
        return GPT2.from_pretrained(directory), {**metadata, "from_cache": True, "directory": directory}
    model, metadata = pretrain_new(config, token_stream(texts, tokenizer), settings, on_step)
    metadata.update(key=key, corpus_sha256=corpus_sha256, corpus_documents=len(texts))
    write_cache(directory, model, metadata)
    return model, {**metadata, "from_cache": False, "directory": directory}


def pretrain_new(config: GPT2Config, stream: torch.Tensor, settings: PretrainConfig, on_step=None):
    """A freshly initialised model pretrained on stream minus its held-out tail; (model, metadata)."""
    started = time.perf_counter()
    torch.manual_seed(settings.seed)
    model = GPT2(config)
    cut = int(stream.numel() * (1 - settings.heldout_fraction))
    train_stream, heldout = stream[:cut], stream[cut:]
    vocab, counts = torch.unique(stream, return_counts=True) if settings.corpus_vocab_head else (None, None)
    loss_at_init = heldout_loss(model, heldout)
    every = max(1, settings.steps // 10)

    def progress(step, loss):
        if step % every == 0 or step == settings.steps:
            logger.info("pretraining the offline base: step %d/%d, loss %.3f, %.0fs", step, settings.steps, loss,
                        time.perf_counter() - started)
        if on_step is not None:
            on_step(step, loss)

    losses = pretrain(model, train_stream, settings, vocab, progress)
    metadata = {"model_config": dataclasses.asdict(config), "settings": dataclasses.asdict(settings),
                "corpus_tokens": int(stream.numel()), "trained_tokens": settings.steps * settings.batch_size
                * config.n_positions, "heldout_tokens": int(heldout.numel()), "heldout_loss_at_init": loss_at_init}
    if vocab is not None:
        metadata["corpus_vocab_size"] = int(vocab.numel())
        metadata["heldout_loss_corpus_vocab"] = heldout_loss(model, heldout, vocab)
        fill_untrained_rows(model, vocab, counts)
    metadata.update(heldout_loss_full_vocab=heldout_loss(model, heldout), train_losses=losses[::10] + losses[-1:],
                    pretrain_seconds=time.perf_counter() - started, torch_version=torch.__version__)
    return model, metadata


def read_cached(directory: str, key: str) -> Optional[dict]:
    """The metadata of a complete cache entry for key at directory, or None."""
    try:
        with open(os.path.join(directory, "metadata.json")) as f:
            metadata = json.load(f)
    except (OSError, ValueError):
        return None
    complete = all(os.path.exists(os.path.join(directory, name)) for name in ("config.json", "model.safetensors"))
    return metadata if complete and metadata.get("key") == key else None


def write_cache(directory: str, model: GPT2, metadata: dict):
    """Save model and metadata into a temporary directory beside `directory`, then rename it into place."""
    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(directory)}.", suffix=".tmp")
    try:
        model.save_pretrained(tmp)
        with open(os.path.join(tmp, "metadata.json"), "w") as f:
            json.dump(metadata, f, indent=1)
        if os.path.isdir(directory):  # an incomplete or stale entry under the same key
            shutil.rmtree(directory)
        os.rename(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

