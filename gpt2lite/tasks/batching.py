"""Batches of tokenized examples: dynamic padding and length-grouped ordering."""

from __future__ import annotations

from typing import Dict, Iterator, List, Sequence

import torch

from gpt2lite.loss import IGNORE_INDEX
from gpt2lite.tokenizer import pad_batch


class Examples(torch.utils.data.Dataset):
    """A list of tokenized examples (dicts of lists) plus the counts of what was skipped while building it."""

    def __init__(self, rows: List[dict], skipped: Dict[str, int] = None, truncated: Dict[str, int] = None):
        self.rows = rows
        self.skipped = dict(skipped or {})
        self.truncated = dict(truncated or {})

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return self.rows[index]

    def lengths(self) -> List[int]:
        return [len(row["input_ids"]) for row in self.rows]


def collate(rows: Sequence[dict], pad_id: int = 50256, padding_side: str = "right") -> Dict[str, torch.Tensor]:
    """Pad a list of examples to the batch's longest: input_ids with pad_id, labels with -100.

    Rows hold "input_ids" (list), and optionally "labels": a list as long as input_ids (token targets,
    padded with -100) or an int (a class label). Right padding for training; left padding for generation.
    """
    batch = pad_batch([row["input_ids"] for row in rows], pad_id, padding_side)
    if "labels" in rows[0] and isinstance(rows[0]["labels"], (list, tuple)):  # token targets, padded with -100
        for i, row in enumerate(rows):
            if len(row["labels"]) != len(row["input_ids"]):
                raise ValueError(f"row {i} has {len(row['labels'])} labels for {len(row['input_ids'])} input_ids; "
                                 "token labels need one target (or -100) per input id")
        batch["labels"] = pad_batch([row["labels"] for row in rows], IGNORE_INDEX, padding_side)["input_ids"]
    elif "labels" in rows[0]:
        batch["labels"] = torch.as_tensor([row["labels"] for row in rows], dtype=torch.long)  # (B,)
    return batch


class LengthGroupedSampler(torch.utils.data.Sampler):
    """Indices in an order where neighbours have similar lengths, so padded batches waste little.

    As transformers' LengthGroupedSampler: shuffle (seeded by seed + epoch), cut into mega-batches of
    batch_size * mega_batch_mult, sort each mega-batch by length (longest first). Batches stay random
    across the epoch while each batch is nearly uniform in length. Call set_epoch(e) for a new order.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, mega_batch_mult: int = 50, seed: int = 0):
        if batch_size <= 0 or mega_batch_mult <= 0:
            raise ValueError("batch_size and mega_batch_mult must be positive")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.mega_batch_mult = mega_batch_mult
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        size = self.batch_size * self.mega_batch_mult
        for start in range(0, len(order), size):
            mega_batch = sorted(order[start:start + size], key=lambda i: -self.lengths[i])
            yield from mega_batch
