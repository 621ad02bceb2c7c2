"""gpt2lite: GPT-2 and its fine-tuning methods, written by hand in PyTorch."""

from .config import GPT2Config
from .generate import GenerationConfig, KVCache, generate
from .kernels import use_fast_kernels  # on by default; use_fast_kernels(model, False): the textbook paths
from .model import GPT2, GPT2ForSequenceClassification, count_parameters
from .tokenizer import Tokenizer
from . import peft  # the fine-tuning methods: gpt2lite.peft.apply(model, {"name": "lora", ...})

__all__ = ["GPT2Config", "GPT2", "GPT2ForSequenceClassification", "Tokenizer", "generate", "GenerationConfig",
           "KVCache", "count_parameters", "use_fast_kernels"]
__version__ = "0.1.0"
