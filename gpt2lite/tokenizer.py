"""GPT-2's byte-level BPE tokenizer through tiktoken, working offline from the bundled ranks file."""

from __future__ import annotations

import os
from typing import Iterable, List, Optional, Sequence

import torch

ASSET = os.path.join(os.path.dirname(__file__), "assets", "gpt2.tiktoken")
ASSET_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# GPT-2's pre-tokenisation pattern, as in tiktoken_ext.openai_public (r50k_pat_str)
PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
EOT = "<|endoftext|>"

_ENCODING = None


def _encoding():
    global _ENCODING
    if _ENCODING is None:
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe

        ranks = load_tiktoken_bpe(ASSET, expected_hash=ASSET_SHA256)
        _ENCODING = tiktoken.Encoding(
            name="gpt2", pat_str=PATTERN, mergeable_ranks=ranks, special_tokens={EOT: 50256}
        )
    return _ENCODING


class Tokenizer:
    """GPT-2's tokenizer: 50,257 tokens, <|endoftext|> = 50256 serves as eos and as padding."""

    def __init__(self):
        self._enc = _encoding()
        self.eos_id = 50256
        self.pad_id = 50256
        self.vocab_size = self._enc.n_vocab  # 50257

    def encode(self, text: str, allow_special: bool = True) -> List[int]:
        """Token ids of `text`. With allow_special (as Hugging Face's GPT-2 tokenizer does), the literal
        "<|endoftext|>" becomes id 50256; otherwise it is encoded as ordinary text."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        if allow_special:
            return self._enc.encode(text, allowed_special={EOT})
        return self._enc.encode(text, disallowed_special=())

    def decode(self, ids: Iterable[int]) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self._enc.decode(list(ids), errors="replace")

    def decode_batch(self, batch) -> List[str]:
        return [self.decode(ids) for ids in batch]

    def __len__(self):
        return self.vocab_size

    def encode_batch(
        self,
        texts: Sequence[str],
        padding_side: str = "right",
        max_length: Optional[int] = None,
        truncation_side: str = "right",
        add_eos: bool = False,
    ) -> dict:
        """Encode and pad a batch. Returns {"input_ids": (B, T) long, "attention_mask": (B, T) long}.

        max_length truncates each text (keeping its start with truncation_side="right", its end with
        "left"); padding goes on `padding_side` ("left" for generation) with the eos id.
        """
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a list of strings; use encode() for one text")
        if padding_side not in ("left", "right") or truncation_side not in ("left", "right"):
            raise ValueError("padding_side and truncation_side must be 'left' or 'right'")
        if max_length is not None and max_length <= 0:
            raise ValueError(f"max_length must be positive, got {max_length}")
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("encode_batch takes a list of strings")
        rows = self._enc.encode_batch(list(texts), allowed_special={EOT})
        if add_eos:
            rows = [r + [self.eos_id] for r in rows]
        if max_length is not None:
            rows = [r[:max_length] if truncation_side == "right" else r[-max_length:] for r in rows]
        return pad_batch(rows, self.pad_id, padding_side)


def pad_batch(rows: Sequence[Sequence[int]], pad_id: int, padding_side: str = "right") -> dict:
    """Pad lists of ids to one length with pad_id, on padding_side ("right" for training, "left" for
    generation). Returns {"input_ids", "attention_mask"} as (B, T) long tensors. tasks.collate pads
    examples (ids and labels) through it."""
    if len(rows) == 0:
        raise ValueError("cannot pad an empty batch")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r)
        if n == 0:
            continue
        where = slice(0, n) if padding_side == "right" else slice(width - n, width)
        ids[i, where] = torch.as_tensor(list(r), dtype=torch.long)
        mask[i, where] = 1
    return {"input_ids": ids, "attention_mask": mask}
