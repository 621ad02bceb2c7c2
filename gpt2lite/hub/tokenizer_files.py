"""GPT-2's tokenizer in Hugging Face's files (vocab.json, merges.txt), derived offline from the bundled ranks.

A tiktoken ranks file lists each token's bytes and rank; byte-level BPE merges the adjacent pair whose
merged bytes have the lowest rank. So the merge that creates a token is found by running that BPE on the
token's own bytes, stopping before its rank: it ends in exactly two parts, and those are the merge. This is
how tiktoken's ranks are turned back into GPT-2's 50,000 merges, in rank order. Hugging Face writes each
byte as a printable character (GPT-2's `bytes_to_unicode` table), in vocab.json and merges.txt alike.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Tuple

from gpt2lite.files import atomic_write_text
from gpt2lite.tokenizer import ASSET, ASSET_SHA256, EOT

FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


def bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's table from each byte to a printable character (printable bytes map to themselves)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    characters = printable[:]
    shift = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            characters.append(256 + shift)
            shift += 1
    return dict(zip(printable, map(chr, characters)))


def _merge_parts(ranks: Dict[bytes, int], token: bytes, max_rank: int) -> List[bytes]:
    """Byte-level BPE on `token`, applying only merges ranked below max_rank."""
    parts = [bytes([b]) for b in token]
    while True:
        best_index, best_rank = None, None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < max_rank and (best_rank is None or rank < best_rank):
                best_index, best_rank = i, rank
        if best_index is None:
            return parts
        parts[best_index:best_index + 2] = [parts[best_index] + parts[best_index + 1]]


def vocab_and_merges() -> Tuple[Dict[str, int], List[Tuple[str, str]]]:
    """GPT-2's vocab (token string -> id, 50,257 entries) and merges (50,000 pairs, in rank order)."""
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(ASSET, expected_hash=ASSET_SHA256)
    printable = bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(printable[b] for b in token)

    vocab, merges = {}, []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        vocab[text(token)] = rank
        if len(token) > 1:
            parts = _merge_parts(ranks, token, rank)
            if len(parts) != 2:
                raise ValueError(f"token {token!r} (rank {rank}) is not the merge of two lower-ranked tokens")
            merges.append((text(parts[0]), text(parts[1])))
    vocab[EOT] = len(ranks)  # 50256
    return vocab, merges


def save_tokenizer_files(directory: str, model_max_length: int = 1024) -> List[str]:
    """Write GPT-2's tokenizer files into `directory` so that transformers.AutoTokenizer.from_pretrained
    loads it (offline) and encodes exactly as gpt2lite.Tokenizer does; returns the paths written."""
    vocab, merges = vocab_and_merges()
    special = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}
    config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": model_max_length, "add_prefix_space": False,
              "add_bos_token": False, **special}
    contents = {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
        "tokenizer_config.json": json.dumps(config, indent=2),
        "special_tokens_map.json": json.dumps(special, indent=2),
    }
    paths = []
    for name, content in contents.items():
        path = os.path.join(directory, name)
        atomic_write_text(path, content)
        paths.append(path)
    return paths
