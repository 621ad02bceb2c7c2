"""gpt2lite: GPT-2 and its fine-tuning methods, written by hand in PyTorch."""

from gpt2lite.model.config import GPT2Config
from gpt2lite.generation.decoding import GenerationConfig, KVCache, generate
from gpt2lite.kernels import use_fast_kernels  # on by default; use_fast_kernels(model, False): the textbook paths
from gpt2lite.model.gpt2 import GPT2, GPT2ForSequenceClassification, count_parameters
from gpt2lite.tokenizer import Tokenizer
from gpt2lite import peft  # the fine-tuning methods: gpt2lite.peft.apply(model, {"name": "lora", ...})

__all__ = ["GPT2Config", "GPT2", "GPT2ForSequenceClassification", "Tokenizer", "generate", "GenerationConfig",
           "KVCache", "count_parameters", "use_fast_kernels"]
__version__ = "0.1.0"
