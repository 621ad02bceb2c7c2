"""GPT-2's byte-level BPE tokenizer: known ids, lossless round trips over the real data, offline, batching."""

import json
import socket

import pytest
import torch

import gpt2lite.tokenizer as tokenizer_module
from gpt2lite import Tokenizer
from gpt2lite.tokenizer import pad_batch


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


def test_known_ids(tok):
    assert tok.encode("Hello, world!") == [15496, 11, 995, 0]
    assert tok.decode([15496, 11, 995, 0]) == "Hello, world!"
    assert tok.eos_id == tok.pad_id == 50256 and len(tok) == tok.vocab_size == 50257
    assert tok.encode("<|endoftext|>") == [50256]  # as Hugging Face's GPT-2 tokenizer
    assert 50256 not in tok.encode("<|endoftext|>", allow_special=False)
    assert tok.decode(torch.tensor([15496, 11, 995, 0])) == "Hello, world!"


def test_round_trip_of_awkward_text(tok):
    texts = ["", " ", "\n\n\n", "  two  spaces ", "tabs\tand\r\nCRLF", "emoji 🤗🚀 and ünïcödé 中文 العربية",
             "don't we'll they're I've", "\x00control\x7f", "a" * 3000, "1234567890" * 20]
    for text in texts:
        assert tok.decode(tok.encode(text)) == text


def _shared_texts(data):
    texts = []
    for line in (data / "cnn_dailymail" / "test.jsonl").read_text().splitlines():
        row = json.loads(line)
        texts += [row["article"], row["highlights"]]
    for name in ("wiki.test.raw", "wiki.valid.raw", "wiki.train.partial.raw"):
        texts += (data / "wikitext-2-raw-v1" / name).read_text().splitlines(keepends=True)
    for name in ("topic_train.jsonl", "topic_valid.jsonl"):
        texts += [json.loads(line)["text"] for line in (data / "twitter-financial-news-topic" / name).read_text().splitlines()]
    return texts


def test_round_trip_over_all_shared_data(tok, shared_data):
    """decode(encode(x)) == x for every CNN article and highlight, wikitext line and tweet."""
    texts = _shared_texts(shared_data)
    assert len(texts) > 25_000
    rows = tok._enc.encode_batch(texts, allowed_special={"<|endoftext|>"}, num_threads=2)
    failures = [t for t, ids in zip(texts, rows) if tok.decode(ids) != t]
    assert failures == []
    # encode() (what users call) agrees with the batch path on a sample
    for i in range(0, len(texts), 500):
        assert tok.encode(texts[i]) == rows[i]


def test_works_with_no_network(monkeypatch, tmp_path):
    """A fresh tokenizer loads the bundled BPE ranks while every socket fails."""

    def no_network(*args, **kwargs):
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # an empty cache: nothing to reuse
    monkeypatch.setattr(tokenizer_module, "_ENCODING", None)  # force a fresh load
    with pytest.raises(OSError):
        socket.create_connection(("example.com", 443))
    tok = Tokenizer()
    assert tok.encode("Hello, world!") == [15496, 11, 995, 0]


def test_encode_batch_padding_masks_truncation(tok):
    texts = ["Hello, world!", "Hi"]
    right = tok.encode_batch(texts)
    assert right["input_ids"].tolist() == [[15496, 11, 995, 0], [17250, 50256, 50256, 50256]]
    assert right["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 0, 0, 0]]
    left = tok.encode_batch(texts, padding_side="left")
    assert left["input_ids"].tolist() == [[15496, 11, 995, 0], [50256, 50256, 50256, 17250]]
    assert left["attention_mask"].tolist() == [[1, 1, 1, 1], [0, 0, 0, 1]]
    assert left["input_ids"].dtype == torch.long and left["attention_mask"].dtype == torch.long
    kept_start = tok.encode_batch(texts, max_length=2)
    assert kept_start["input_ids"].tolist() == [[15496, 11], [17250, 50256]]
    kept_end = tok.encode_batch(texts, max_length=2, truncation_side="left")
    assert kept_end["input_ids"][0].tolist() == [995, 0]
    with_eos = tok.encode_batch(["Hi"], add_eos=True)
    assert with_eos["input_ids"].tolist() == [[17250, 50256]] and with_eos["attention_mask"].tolist() == [[1, 1]]
    assert tok.decode_batch(left["input_ids"][:1]) == ["Hello, world!"]


def test_bad_batch_arguments(tok):
    with pytest.raises(TypeError, match="list of strings"):
        tok.encode_batch("one string")
    with pytest.raises(ValueError, match="padding_side"):
        tok.encode_batch(["a"], padding_side="middle")
    with pytest.raises(ValueError, match="max_length"):
        tok.encode_batch(["a"], max_length=0)
    with pytest.raises(TypeError, match="str"):
        tok.encode(123)
    with pytest.raises(ValueError, match="empty batch"):
        pad_batch([], 0)
