"""The seed tasks' data: prompt masking, truncation, bad input, batching, sliding-window perplexity."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from gpt2lite import GPT2, GPT2Config, Tokenizer
from gpt2lite.loss import IGNORE_INDEX
from gpt2lite.tasks import (DataError, LengthGroupedSampler, build_classification, build_generation_prompts,
                            build_lm_blocks, build_summarization, collate, docstring_corpus, load_table,
                            sliding_window_perplexity, subset)
from gpt2lite.tasks.language_modeling import windows


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer()


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets_cache"))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


# ------------------------------------------------------------------------------------------ summarization


def test_summarization_labels_mask_exactly_the_prompt(tokenizer):
    article, summary = "The cat sat on the mat. It was happy.", "A cat sits.\nIt is happy."
    [row] = build_summarization([{"article": article, "highlights": summary}], tokenizer, max_length=64).rows
    # the pieces tokenize as the whole text does, so training matches the natural tokenization
    assert row["input_ids"] == tokenizer.encode(f"{article}\nTL;DR: {summary}<|endoftext|>")
    n_prompt = len(tokenizer.encode(f"{article}\nTL;DR:"))
    labels = row["labels"]
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == row["input_ids"][n_prompt:]
    assert tokenizer.decode(labels[n_prompt:]) == f" {summary}<|endoftext|>"
    assert labels[-1] == tokenizer.eos_id
    # the evaluation prompt is the training prompt, cut before the target
    [prompt] = build_generation_prompts([{"article": article, "highlights": summary}], tokenizer, max_length=64,
                                        max_new_tokens=8).rows
    assert prompt["input_ids"] == row["input_ids"][:n_prompt]
    assert prompt["reference"] == summary


def test_summarization_loss_only_on_target_tokens(tokenizer):
    torch.manual_seed(0)
    model = GPT2(GPT2Config.from_name("tiny", n_positions=64)).eval()
    [row] = build_summarization([{"doc": "Some long source text about things.", "sum": "Short."}], tokenizer,
                                input_column="doc", target_column="sum", max_length=64).rows
    batch = collate([row])
    loss = model(**batch)
    logits = model(batch["input_ids"])[0]  # (T, V)
    n_prompt = row["labels"].count(IGNORE_INDEX)
    direct = F.cross_entropy(logits[n_prompt - 1:-1], batch["input_ids"][0, n_prompt:])
    torch.testing.assert_close(loss, direct, rtol=1e-5, atol=1e-6)


def test_source_truncated_to_fit_context_and_target_kept(tokenizer):
    article = " ".join(["word"] * 500)
    ex = build_summarization([{"article": article, "highlights": "The summary stays whole."}], tokenizer,
                             max_length=40)
    row = ex.rows[0]
    assert len(row["input_ids"]) == 40
    target = [t for t in row["labels"] if t != IGNORE_INDEX]
    assert tokenizer.decode(target) == " The summary stays whole.<|endoftext|>"
    assert ex.truncated["source"] == 1 and ex.truncated["target"] == 0


def test_target_truncated_away_is_skipped_and_counted(tokenizer, caplog):
    rows = [{"article": "Short source.", "highlights": "fine"},
            {"article": "Another source text here.", "highlights": " ".join(["long"] * 200)},
            {"article": "x", "highlights": ""}]
    # a template whose fixed part fills the context except for min_source_tokens
    template = "Read this: {article}\n" + "Summary please " * 5 + "TL;DR: {summary}<|endoftext|>"
    fixed = len(tokenizer.encode("Read this: ")) + len(tokenizer.encode("\n" + "Summary please " * 5 + "TL;DR:"))
    max_length = fixed + 4
    with caplog.at_level("WARNING"):
        ex = build_summarization(rows, tokenizer, template=template, max_length=max_length, min_source_tokens=4)
    assert len(ex) == 1  # first row fits
    assert ex.skipped == {"empty_source": 0, "empty_target": 1, "target_truncated_away": 1}
    assert "skipped 2 of 3" in caplog.text and "target_truncated_away: 1" in caplog.text
    assert all(len(r["input_ids"]) <= max_length for r in ex.rows)
    with pytest.raises(DataError, match="all 1 examples were skipped"):
        build_summarization(rows[1:2], tokenizer, template=template, max_length=max_length, min_source_tokens=4)


def test_long_target_truncated_and_counted(tokenizer):
    ex = build_summarization([{"article": "a b c d e f g h", "highlights": " ".join(["long"] * 100)}], tokenizer,
                             max_length=32, min_source_tokens=4)
    row = ex.rows[0]
    assert len(row["input_ids"]) == 32 and ex.truncated["target"] == 1
    assert row["labels"].count(IGNORE_INDEX) == len(tokenizer.encode("a b c d")) + len(tokenizer.encode("\nTL;DR:"))


def test_bad_template_is_an_error(tokenizer):
    with pytest.raises(DataError, match="once each"):
        build_summarization([{"article": "a", "highlights": "b"}], tokenizer, template="{article} only")
    with pytest.raises(DataError, match="before"):
        build_summarization([{"article": "a", "highlights": "b"}], tokenizer, template="{summary} {article}")


# ------------------------------------------------------------------------------------------ loading errors


def test_local_jsonl_loads_and_subsets(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"article": f"a{i}", "highlights": f"h{i}"} for i in range(10)])
    table = load_table(data_files=path)
    assert len(table) == 10 and table.column_names == ["article", "highlights"]
    half = subset(table, data_fraction=0.5, seed=1)
    assert len(half) == 5 and len(set(half["article"])) == 5
    assert subset(table, data_fraction=0.5, seed=1)["article"] == half["article"]  # reproducible
    assert len(subset(table, max_samples=3)) == 3
    with pytest.raises(DataError, match="data_fraction"):
        subset(table, data_fraction=0.0)


def test_invalid_json_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"article": "a", "highlights": "b"}\n{"article": "broken\n')
    with pytest.raises(DataError, match=r"line 2 is not valid JSON"):
        load_table(data_files=str(path))


def test_empty_dataset_is_an_error(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        load_table(data_files=str(empty))
    header_only = tmp_path / "empty.csv"
    header_only.write_text("text,label\n")
    with pytest.raises(DataError, match="no rows"):
        load_table(data_files=str(header_only))
    with pytest.raises(DataError, match="does not exist"):
        load_table(data_files=str(tmp_path / "missing.jsonl"))


def test_missing_column_names_the_existing_ones(tmp_path, tokenizer):
    table = load_table(data_files=write_jsonl(tmp_path / "d.jsonl", [{"document": "a", "summary": "b"}]))
    with pytest.raises(DataError, match=r"no column 'article'.*\['document', 'summary'\]"):
        build_summarization(table, tokenizer)
    ex = build_summarization(table, tokenizer, input_column="document", target_column="summary")
    assert len(ex) == 1


def test_hub_unreachable_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="--data.train"):
        load_table("gpt2lite-no-such-dataset-xyz", split="train")


def test_label_out_of_range_is_an_error_before_training(tmp_path, tokenizer):
    path = tmp_path / "cls.csv"
    path.write_text("text,label\nstocks up,0\nbonds down,1\nweird,20\n")
    table = load_table(data_files=str(path))
    with pytest.raises(DataError, match=r"row 2: label 20 is out of range.*\[0, 20\)"):
        build_classification(table, tokenizer, num_labels=20)
    with pytest.raises(DataError, match="not an integer"):
        build_classification([{"text": "a", "label": "bullish"}], tokenizer)


def test_classification_examples_and_padding(tokenizer):
    rows = [{"text": "Stocks rally", "label": 3}, {"text": "", "label": 1},
            {"text": "Fed holds rates steady today", "label": 0}]
    ex = build_classification(rows, tokenizer, num_labels=5)
    assert len(ex) == 2 and ex.skipped["empty_text"] == 1
    batch = collate(ex.rows)
    assert batch["labels"].tolist() == [3, 0]
    short = len(tokenizer.encode("Stocks rally"))
    assert batch["attention_mask"][0].tolist() == [1] * short + [0] * (batch["input_ids"].shape[1] - short)
    assert (batch["input_ids"][0, short:] == tokenizer.pad_id).all()


def test_classifier_reads_the_last_real_token_under_right_padding(tokenizer):
    from gpt2lite import GPT2ForSequenceClassification

    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(GPT2Config.from_name("tiny", pad_token_id=50256), num_labels=4).eval()
    ex = build_classification([{"text": "Stocks rally hard", "label": 1}, {"text": "Fed", "label": 2}], tokenizer)
    padded = model(**{k: v for k, v in collate(ex.rows).items() if k != "labels"})
    alone = torch.cat([model(**{k: v for k, v in collate([r]).items() if k != "labels"}) for r in ex.rows])
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ batching


def test_collate_pads_right_with_ignored_labels():
    batch = collate([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4], "labels": [4]}], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    left = collate([{"input_ids": [1, 2]}, {"input_ids": [3]}], pad_id=0, padding_side="left")
    assert left["input_ids"].tolist() == [[1, 2], [0, 3]] and left["attention_mask"].tolist() == [[1, 1], [0, 1]]


def test_collate_names_the_row_whose_labels_and_ids_differ_in_length():
    rows = [{"input_ids": [1, 2], "labels": [1, 2]}, {"input_ids": [3, 4, 5], "labels": [4, 5]}]
    with pytest.raises(ValueError, match="row 1 has 2 labels for 3 input_ids"):
        collate(rows)
    with pytest.raises(ValueError, match="padding_side must be 'left' or 'right', got 'middle'"):
        collate(rows[:1], padding_side="middle")


def test_length_grouped_sampler_groups_and_covers_everything():
    lengths = [(i * 37) % 101 for i in range(400)]
    sampler = LengthGroupedSampler(lengths, batch_size=8, mega_batch_mult=10, seed=3)
    order = list(sampler)
    assert sorted(order) == list(range(400))
    assert order == list(LengthGroupedSampler(lengths, batch_size=8, mega_batch_mult=10, seed=3))
    sampler.set_epoch(1)
    assert list(sampler) != order
    batches = [order[i:i + 8] for i in range(0, 400, 8)]
    grouped_waste = sum(8 * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches)
    random_order = torch.randperm(400, generator=torch.Generator().manual_seed(0)).tolist()
    random_waste = sum(8 * max(lengths[i] for i in random_order[j:j + 8]) - sum(lengths[i] for i in random_order[j:j + 8])
                       for j in range(0, 400, 8))
    assert grouped_waste < random_waste / 4
    for start in range(0, 400, 80):  # each mega-batch is sorted longest first
        mega = [lengths[i] for i in order[start:start + 80]]
        assert mega == sorted(mega, reverse=True)


# ------------------------------------------------------------------------------------------ language modelling


def test_lm_blocks_concatenate_and_drop_the_remainder(tokenizer):
    texts = [" = Title = \n", " Some text about a lobster .\n", " More text here .\n"]
    stream = tokenizer.encode("".join(texts))
    ex = build_lm_blocks(texts, tokenizer, block_size=5)
    assert [r["input_ids"] for r in ex.rows] == [stream[i:i + 5] for i in range(0, len(stream) // 5 * 5, 5)]
    assert ex.skipped["remainder_tokens"] == len(stream) % 5
    assert all(r["labels"] == r["input_ids"] for r in ex.rows)
    with pytest.raises(DataError, match="fewer than one block"):
        build_lm_blocks(texts, tokenizer, block_size=10_000)


@pytest.fixture(scope="module")
def lm_model():
    torch.manual_seed(0)
    return GPT2(GPT2Config.from_name("tiny", n_positions=32, vocab_size=300)).eval().requires_grad_(False)


def token_nll(model, ids, begin, end):
    """Per-token NLL (T-1,) of ids[begin:end] predicted inside that window."""
    window = torch.as_tensor(ids[begin:end]).unsqueeze(0)
    logits = model(window)[0]  # (T, V)
    return F.cross_entropy(logits[:-1], window[0, 1:], reduction="none")


def test_perplexity_stride_equal_to_window_is_the_chunked_loss(lm_model):
    ids = torch.randint(0, 300, (101,), generator=torch.Generator().manual_seed(0)).tolist()
    result = sliding_window_perplexity(lm_model, ids, window=16, stride=16)
    losses, counts = [], []
    for begin in range(0, 101, 16):
        chunk = torch.as_tensor(ids[begin:begin + 16]).unsqueeze(0)
        if chunk.shape[1] < 2:
            continue
        losses.append(float(lm_model(input_ids=chunk, labels=chunk)) * (chunk.shape[1] - 1))
        counts.append(chunk.shape[1] - 1)
    assert result.scored_tokens == sum(counts)
    assert result.loss == pytest.approx(sum(losses) / sum(counts), rel=1e-6)
    assert result.perplexity == pytest.approx(math.exp(sum(losses) / sum(counts)), rel=1e-6)
    assert (result.window, result.stride) == (16, 16)


def test_sliding_window_perplexity_matches_direct_computation(lm_model):
    ids = torch.randint(0, 300, (75,), generator=torch.Generator().manual_seed(1)).tolist()
    window, stride = 20, 6
    result = sliding_window_perplexity(lm_model, ids, window=window, stride=stride)
    # direct: token t (t >= 1) is scored once, in the first window that reaches it, with all that window's context
    nll = []
    previous_end = 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        per_token = token_nll(lm_model, ids, begin, end)  # predicts tokens begin+1 .. end-1
        first_new = max(previous_end, begin + 1)
        nll.extend(per_token[first_new - begin - 1:].tolist())
        previous_end = end
        if end == len(ids):
            break
    assert len(nll) == len(ids) - 1 == result.scored_tokens  # every token but the first, once
    assert result.loss == pytest.approx(sum(nll) / len(nll), rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)
    assert result.stride == stride and result.to_dict()["stride"] == stride


def test_windows_cover_each_token_once():
    for n, window, stride in [(100, 16, 16), (100, 16, 5), (7, 16, 8), (33, 8, 1)]:
        scored = []
        for begin, end, n_scored in windows(n, window, stride):
            assert 0 < n_scored <= end - begin - 1
            scored.extend(range(end - n_scored, end))
        assert len(scored) == len(set(scored))
        if stride < window:
            assert scored == list(range(1, n))


# ------------------------------------------------------------------------------------------ offline corpus


def test_docstring_corpus_is_deterministic_and_usable(tokenizer):
    corpus = docstring_corpus(max_examples=60)
    again = docstring_corpus(max_examples=60)
    assert corpus == again
    assert sum(len(v) for v in corpus.values()) == 60 and len(corpus["train"]) > 30
    for example in corpus["train"]:
        assert example["target"] and "\n" not in example["target"]
        assert example["target"] not in example["source"]  # the summary line is not in the source
    ex = build_summarization(corpus["train"], tokenizer, input_column="source", target_column="target",
                             max_length=128)
    assert len(ex) == len(corpus["train"]) and all(len(r["input_ids"]) <= 128 for r in ex.rows)
