"""Language modelling scores exactly the text it is given: a .raw/.txt file's own bytes (blank lines, headings,
trailing spaces and line endings included), a hub dataset's rows joined with "\\n\\n" as Hugging Face's
perplexity guide joins WikiText's. Checked against transformers and the guide's sliding-window method."""

import json
import math

import pytest
import torch

from gpt2lite import GPT2, Tokenizer
from gpt2lite.cli import run
from gpt2lite.tasks.splits import DataConfig, load_splits
from gpt2lite.generation.decoding import GenerationConfig
from gpt2lite.tasks.builders import build_task

WINDOW, STRIDE = 64, 32

# WikiText's layout: headings between blank lines, a leading and a trailing space on every line, and here a
# few more trailing spaces, a line of spaces, a CRLF line and no newline at the end
TEXT = (" = Valkyria Chronicles III = \n \n Senjō no Valkyria 3 : Unrecorded Chronicles is a tactical role @-@ "
        "playing video game developed by Sega .   \n\n = = Gameplay = = \n \n As with previous games , the "
        "player takes control of a squad .  \r\n\n    \n = = = Plot = = = \n The game began development in "
        "2010 , carrying over a large portion of the work . \n\n\n Its story runs parallel to the first game")
ROWS = [" = Robert Boulter = \n", "", " Robert Boulter is an English film , television and theatre actor . \n", "",
        " = = Career = = \n", "", " = = = 2000 – 2005 = = = \n", "", " In 2000 Boulter had a guest @-@ starring "
        "role on the television series The Bill ; he portrayed \" Scott Parry \" in the episode . \n", " \n",
        " He had a recurring role in 2003 . \n"]


pytestmark = pytest.mark.usefixtures("hub_offline")


@pytest.fixture(scope="module")
def reference(tiny_hf_dir, tmp_path_factory):
    """(transformers model, transformers tokenizer): the tiny checkpoint with GPT-2's tokenizer files."""
    transformers = pytest.importorskip("transformers")
    from gpt2lite.hub.tokenizer_files import save_tokenizer_files

    directory = tmp_path_factory.mktemp("tokenizer")
    save_tokenizer_files(str(directory))
    return (transformers.GPT2LMHeadModel.from_pretrained(tiny_hf_dir).eval(),
            transformers.AutoTokenizer.from_pretrained(str(directory)))


def guide_perplexity(model, tokenizer, text: str, window: int = WINDOW, stride: int = STRIDE):
    """(scored tokens, perplexity) by the HF guide "Perplexity of fixed-length models": windows of `window`
    tokens advancing by `stride`, each scoring the tokens after the previous window's end. The tokens a
    window's mean loss covers are counted from its shifted labels (the guide's valid labels less one per
    row, exactly)."""
    input_ids = tokenizer(text, return_tensors="pt").input_ids
    seq_len, nll_sum, n_tokens, prev_end = input_ids.size(1), 0.0, 0, 0
    with torch.no_grad():
        for begin in range(0, seq_len, stride):
            end = min(begin + window, seq_len)
            target_len = end - prev_end
            ids = input_ids[:, begin:end]
            targets = ids.clone()
            targets[:, :-target_len] = -100
            loss = model(ids, labels=targets).loss
            counted = int((targets[:, 1:] != -100).sum())
            nll_sum, n_tokens, prev_end = nll_sum + float(loss) * counted, n_tokens + counted, end
            if end == seq_len:
                break
    return n_tokens, math.exp(nll_sum / n_tokens)


@pytest.mark.parametrize("suffix", [".raw", ".txt"])
def test_cli_perplexity_of_a_text_file_is_that_of_its_exact_text(suffix, tmp_path, tiny_hf_dir, reference):
    model, tokenizer = reference
    test_file = tmp_path / f"test{suffix}"
    test_file.write_bytes(TEXT.encode("utf-8"))
    for name in ("train", "valid"):
        (tmp_path / f"{name}{suffix}").write_text(" = Other = \n\n Some other text for the split . \n" * 8)
    result = run(["evaluate", "--model", str(tiny_hf_dir), "--data.task", "language_modeling",
                  "--data.train", str(tmp_path / f"train{suffix}"), "--data.validation", str(tmp_path / f"valid{suffix}"),
                  "--data.test", str(test_file), "--data.max_length", str(WINDOW), "--data.stride", str(STRIDE),
                  "--generation.max_new_tokens", "4", "--output_dir", str(tmp_path / "evaluation")])
    row = result["rows"][0]
    tokens, perplexity = guide_perplexity(model, tokenizer, test_file.read_bytes().decode("utf-8"))
    assert len(tokenizer(TEXT).input_ids) == tokens + 1 > WINDOW + STRIDE  # all but the first token; 3 windows
    assert row["perplexity_tokens"] == tokens
    assert row["perplexity"] == pytest.approx(perplexity, rel=1e-5)
    assert json.load(open(tmp_path / "evaluation" / "report.json"))["rows"][0]["perplexity_tokens"] == tokens


def test_hub_rows_are_joined_as_the_perplexity_guide_joins_them(monkeypatch, tiny_hf_dir, reference):
    """WikiText from the hub: the test text is "\\n\\n".join(test["text"]) (blank rows included), and the
    training blocks are cut from the train rows joined the same way."""
    import gpt2lite.tasks.splits

    model, tokenizer = reference

    def fake_load_table(dataset=None, config_name=None, data_files=None, split="train", max_rows=None, **kwargs):
        return [{"text": row} for row in (ROWS if split == "test" else ROWS[::-1] * 3)]

    monkeypatch.setattr(gpt2lite.tasks.splits, "load_table", fake_load_table)
    data = DataConfig(task="language_modeling", dataset="wikitext", dataset_config="wikitext-2-raw-v1",
                      max_length=WINDOW, stride=STRIDE)
    task = build_task(data, load_splits(data), Tokenizer(), WINDOW, GenerationConfig(max_new_tokens=4))
    scores, _ = task.evaluate(GPT2.from_pretrained(str(tiny_hf_dir)).eval())
    tokens, perplexity = guide_perplexity(model, tokenizer, "\n\n".join(ROWS))
    assert scores["perplexity_tokens"] == tokens and scores["perplexity"] == pytest.approx(perplexity, rel=1e-5)
    stream = tokenizer("\n\n".join(ROWS[::-1] * 3)).input_ids
    blocks = [token for row in task.train.rows for token in row["input_ids"]]
    assert blocks == stream[:len(blocks)] and len(stream) - len(blocks) < WINDOW


def test_text_file_rows_keep_their_line_endings_for_language_modelling(tmp_path):
    """One file cut into three splits: each split's rows are whole lines with their endings, so every split's
    text is made of the file's own lines; other tasks still read a text file's lines without them."""
    path = tmp_path / "corpus.raw"
    lines = [f" = Heading {i} = \n" if i % 5 == 0 else (" \n" if i % 5 == 1 else f" line {i} .  \r\n")
             for i in range(40)]
    path.write_bytes("".join(lines).encode())
    splits = load_splits(DataConfig(task="language_modeling", train=str(path)))
    parts = [list(table["text"]) for table in (splits.train, splits.validation, splits.test)]
    assert sorted(row for part in parts for row in part) == sorted(lines)
    assert [splits.separator(s) for s in ("train", "validation", "test")] == ["", "", ""]
    whole = load_splits(DataConfig(task="language_modeling", train=str(path), validation=str(path), test=str(path)))
    assert "".join(whole.test["text"]) == path.read_bytes().decode()
    from gpt2lite.tasks import load_table

    assert list(load_table(data_files=str(path))["text"])[:2] == [" = Heading 0 = ", " "]
