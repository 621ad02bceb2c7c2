"""gpt2lite: GPT-2 and its fine-tuning methods, written by hand in PyTorch.

The face: what a notebook uses. Everything else is in the package of its stage (model, hub, peft, generation,
tasks, training, experiment; see ARCHITECTURE.md).
"""

from gpt2lite import peft  # the fine-tuning methods: gpt2lite.peft.apply(model, {"name": "lora", ...})
from gpt2lite.errors import CheckpointError, DataError
from gpt2lite.generation import GenerationConfig, KVCache, generate
from gpt2lite.kernels import use_fast_kernels  # on by default; use_fast_kernels(model, False): the textbook paths
from gpt2lite.model import GPT2, GPT2Config, GPT2ForSequenceClassification, count_parameters
from gpt2lite.seed import seed_everything
from gpt2lite.tasks.builders import build_task
from gpt2lite.tasks.splits import DataConfig, load_splits
from gpt2lite.tokenizer import Tokenizer
from gpt2lite.training import TrainConfig, train

__all__ = ["GPT2Config", "GPT2", "GPT2ForSequenceClassification", "count_parameters", "Tokenizer", "GenerationConfig",
           "KVCache", "generate", "TrainConfig", "train", "DataConfig", "load_splits", "build_task",
           "CheckpointError", "DataError", "use_fast_kernels", "seed_everything", "peft"]
__version__ = "0.1.0"
