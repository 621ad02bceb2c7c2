"""Shared test fixtures: random-init transformers checkpoints written once per session, the shared data path.

No test reaches the Hugging Face Hub: HF_HUB_OFFLINE is set before transformers or huggingface_hub load,
and every checkpoint is a random initialisation that transformers writes with save_pretrained.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub reads its constants
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import save_random  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

# The tiny configuration shared by the parity tests: GPT-2's real vocabulary, so token ids from the tokenizer work.
TINY_HF_KWARGS = dict(n_layer=2, n_head=4, n_embd=64, n_positions=128)
NUM_LABELS = 20  # as twitter-financial-news-topic


@pytest.fixture
def hub_offline(monkeypatch, tmp_path):
    """No hub: transformers and datasets offline, and a datasets cache of the test's own."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets_cache"))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a slow test not needed for any Done-when item (still run in CI)")


def hf_gpt2_config(**overrides):
    """A transformers GPT2Config: the tiny test size unless overridden."""
    import transformers

    return transformers.GPT2Config(**{**TINY_HF_KWARGS, **overrides})


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    """Directory of a random-init transformers GPT2LMHeadModel (tiny config) written by save_pretrained."""
    import transformers

    directory = tmp_path_factory.mktemp("tiny_hf_gpt2")
    save_random(transformers.GPT2LMHeadModel, hf_gpt2_config(), directory, seed=0)
    return directory


@pytest.fixture(scope="session")
def tiny_hf_classifier_dir(tmp_path_factory):
    """Directory of a random-init transformers GPT2ForSequenceClassification: tiny, 20 labels, pad id 50256."""
    import transformers

    directory = tmp_path_factory.mktemp("tiny_hf_classifier")
    config = hf_gpt2_config(num_labels=NUM_LABELS, pad_token_id=50256)
    save_random(transformers.GPT2ForSequenceClassification, config, directory, seed=1)
    return directory


@pytest.fixture(scope="session")
def gpt2_124m_hf(tmp_path_factory):
    """(directory, model): a random-init transformers GPT2LMHeadModel with the full gpt2 124M config, saved
    once per session (slow: ~500 MB); the model is returned in eval mode so tests need not reload it."""
    import transformers

    directory = tmp_path_factory.mktemp("gpt2_124m_hf")
    model = save_random(transformers.GPT2LMHeadModel, transformers.GPT2Config(), directory, seed=2)
    return directory, model


@pytest.fixture(scope="session")
def shared_data():
    """../shared/data relative to the repository root; tests that need it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def one_thread():
    """One intra-op thread for tests of tiny models and of several processes on 2 cores: oversubscribing
    the cores with PyTorch's default threads makes them several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
