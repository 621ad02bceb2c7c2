"""The two training workloads and the generation prompts, built once and given to both stacks as tensors.

    lm             wikitext-2 text in rows of T tokens, a label on every token (loss over all T - 1 positions
                   that have a token before them)
    summarization  CNN/DailyMail "{article}\nTL;DR: {summary}<|endoftext|>" in rows of exactly T tokens
                   (the article is cut to fit), labels -100 except on the summary tokens and the end token

Labels are aligned with the inputs (both stacks shift them by one inside the loss, as transformers does).
Without the shared data (tests on a machine that lacks it) rows are random tokens with the same label layout.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

IGNORE_INDEX = -100
# ../shared/data beside the repository; GPT2LITE_BENCH_DATA points elsewhere (a GPU machine without ../shared).
DATA_DIR = Path(os.environ.get("GPT2LITE_BENCH_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
SEPARATOR = "\nTL;DR:"


def lm_batches(n_batches: int, batch_size: int, seq_len: int, vocab_size: int = 50257, seed: int = 0):
    """(input_ids, labels), each (n_batches, batch_size, seq_len): consecutive wikitext-2 test tokens."""
    needed = n_batches * batch_size * seq_len
    path = DATA_DIR / "wikitext-2-raw-v1" / "wiki.test.raw"
    if path.is_file():
        from gpt2lite import Tokenizer

        tokenizer = Tokenizer()
        text = path.read_text(encoding="utf-8")
        tokens = []
        for start in range(0, len(text), 200_000):  # encode only as much text as needed
            tokens += tokenizer.encode(text[start:start + 200_000])
            if len(tokens) >= needed:
                break
        ids = torch.tensor(tokens[:needed], dtype=torch.long)
        ids = ids.repeat(needed // ids.numel() + 1)[:needed]  # a tiny text would be cycled
        ids = ids.remainder(vocab_size)
    else:
        ids = torch.randint(0, vocab_size, (needed,), generator=torch.Generator().manual_seed(seed))
    ids = ids.view(n_batches, batch_size, seq_len)  # (S, B, T)
    labels = ids.clone()
    # The first token has nothing before it to be predicted from, except a soft prompt: peft's prompt
    # tuning would then add that one target per row and gpt2lite's would not, so no stack gets it.
    labels[:, :, 0] = IGNORE_INDEX
    return ids, labels


def summarization_rows(seq_len: int, n_rows: int, max_summary: int = 160):
    """Up to n_rows (ids, n_summary) pairs of exactly seq_len tokens from CNN/DailyMail, or [] without data."""
    path = DATA_DIR / "cnn_dailymail" / "test.jsonl"
    if not path.is_file():
        return []
    from gpt2lite import Tokenizer

    tokenizer = Tokenizer()
    separator = tokenizer.encode(SEPARATOR)
    rows = []
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            example = json.loads(line)
            summary = tokenizer.encode(" " + example["highlights"].strip()) + [tokenizer.eos_id]
            room = seq_len - len(separator) - len(summary)
            if len(summary) > max_summary or room < seq_len // 4:
                continue
            article = tokenizer.encode(example["article"].strip())
            if len(article) < room:
                continue  # too short to fill seq_len without padding
            rows.append((article[:room] + separator + summary, len(summary)))
            if len(rows) == n_rows:
                break
    return rows


def summarization_batches(n_batches: int, batch_size: int, seq_len: int, vocab_size: int = 50257, seed: int = 0):
    """(input_ids, labels), each (n_batches, batch_size, seq_len); labels only on summary tokens."""
    n_rows = n_batches * batch_size
    rows = summarization_rows(seq_len, n_rows)
    if not rows:
        generator = torch.Generator().manual_seed(seed)
        random_ids = torch.randint(0, vocab_size, (n_rows, seq_len), generator=generator)
        rows = [(ids.tolist(), seq_len // 8) for ids in random_ids]
    rows = [rows[i % len(rows)] for i in range(n_rows)]
    ids = torch.tensor([r[0] for r in rows], dtype=torch.long).remainder(vocab_size)  # (S * B, T)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for i, (_, n_summary) in enumerate(rows):
        labels[i, seq_len - n_summary:] = ids[i, seq_len - n_summary:]
    shape = (n_batches, batch_size, seq_len)
    return ids.view(shape), labels.view(shape)


def generation_prompts(batch_size: int, prompt_len: int, vocab_size: int = 50257):
    """(batch_size, prompt_len) prompt tokens: the starts of CNN/DailyMail articles (wikitext without it)."""
    rows = summarization_rows(max(prompt_len * 2, 512), batch_size)
    if len(rows) == batch_size and all(len(r[0]) >= prompt_len for r in rows):
        return torch.tensor([r[0][:prompt_len] for r in rows], dtype=torch.long).remainder(vocab_size)
    ids, _ = lm_batches(1, batch_size, prompt_len, vocab_size)
    return ids[0]


def build_inputs(workload: str, n_batches: int, batch_size: int, seq_len: int, vocab_size: int):
    if workload == "lm":
        return lm_batches(n_batches, batch_size, seq_len, vocab_size)
    if workload == "summarization":
        return summarization_batches(n_batches, batch_size, seq_len, vocab_size)
    raise ValueError(f"unknown workload {workload!r}; choose lm or summarization")
