"""One data path (issue 19): every task and every source cuts what it lacks by one seeded rule (split_three),
so train, validation and test are always three disjoint parts."""

import json

import pytest

import gpt2lite.tasks.splits
from gpt2lite.errors import DataError
from gpt2lite.tasks import subset
from gpt2lite.tasks.loading import seeded_order
from gpt2lite.tasks.splits import TASKS, DataConfig, load_splits, split_three


def rows(n):
    return [{"id": i, "article": f"article {i}", "highlights": f"summary {i}", "text": f"text {i}", "label": i % 3}
            for i in range(n)]


def write_jsonl(path, table):
    path.write_text("".join(json.dumps(row) + "\n" for row in table))
    return str(path)


def ids(splits):
    return [[row["id"] for row in table] for table in (splits.train, splits.validation, splits.test)]


@pytest.mark.parametrize("task", TASKS)
def test_one_local_file_gives_three_disjoint_parts_for_every_task(task, tmp_path):
    path = write_jsonl(tmp_path / "one.jsonl", rows(50))
    splits = load_splits(DataConfig(task=task, train=path))
    train, validation, test = (set(part) for part in ids(splits))
    assert (len(train), len(validation), len(test)) == (40, 5, 5)
    assert train | validation | test == set(range(50))
    assert not (train & validation or train & test or validation & test)
    # one rule: every task cuts the same rows for a seed
    assert ids(splits) == ids(load_splits(DataConfig(task="summarization", train=path)))


@pytest.mark.parametrize("task", TASKS)
def test_a_hub_dataset_without_a_test_split_has_it_cut_from_train_for_every_task(task, monkeypatch):
    def fake_load_table(dataset=None, config_name=None, data_files=None, split="train", max_rows=None, **kwargs):
        if split == "test":
            raise DataError(f"{dataset} has no split 'test'")
        return rows(50) if split == "train" else [dict(row, id=100 + row["id"]) for row in rows(7)]

    monkeypatch.setattr(gpt2lite.tasks.splits, "load_table", fake_load_table)
    splits = load_splits(DataConfig(task=task, dataset="some/dataset"), allow_fallback=True)
    train, validation, test = ids(splits)
    assert not splits.fallback
    assert len(validation) == 7 and min(validation) >= 100  # the hub's own validation split
    assert (len(train), len(test)) == (45, 5) and set(train) | set(test) == set(range(50))
    assert not set(train) & set(test)
    assert "test: 5 rows from 10% of its train split (seed 0)" in splits.description


def test_the_offline_corpus_stands_in_for_text_tasks_only(monkeypatch):
    monkeypatch.setattr("gpt2lite.tasks.splits.docstring_corpus", lambda n: {
        s: [{"source": f"{s} source {i}", "target": f"{s} target {i}"} for i in range(4)]
        for s in ("train", "validation", "test")})
    for task in ("summarization", "language_modeling"):
        splits = load_splits(DataConfig(task=task), allow_fallback=True)
        assert splits.fallback and splits.description.startswith("OFFLINE FALLBACK DATA")
        assert len(splits.train) == len(splits.validation) == len(splits.test) == 4
    with pytest.raises(DataError, match="classification has no offline fallback"):
        load_splits(DataConfig(task="classification"), allow_fallback=True)
    with pytest.raises(DataError, match="no data"):
        load_splits(DataConfig())


def test_cuts_and_capped_samples_draw_from_one_seeded_order():
    table = rows(20)
    order = seeded_order(20, seed=3)
    train, validation, test = split_three(table, 0.1, 0.1, seed=3, where="t")
    assert [row["id"] for row in test + validation + train] == order
    assert [row["id"] for row in subset(table, max_samples=6, seed=3)] == order[:6]
