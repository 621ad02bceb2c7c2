"""Know before you run: a run's peak memory (and step time), predicted; the largest batch that fits a budget.

    from gpt2lite.estimation import estimate
    estimate("gpt2-xl", {"name": "lora"}, TrainConfig(batch_size=4)).peak_memory_mb

The command line: `gpt2lite estimate` (the flags and --config of `gpt2lite finetune`).
"""

from gpt2lite.estimation.predict import Estimate, estimate

__all__ = ["Estimate", "estimate"]
