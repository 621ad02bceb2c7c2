"""What `gpt2lite finetune` does, as a script to copy from: data -> LoRA -> adapter, predictions, report.

    python examples/finetune_in_python.py my.jsonl runs/mine      # a JSONL file of {"article", "highlights"}

The command line is the same steps with every option a flag (gpt2lite finetune --help); this script
fixes them in code instead, and has no flags of its own.
"""

import os
import sys

from gpt2lite import Tokenizer
from gpt2lite.cli.pipeline import save_outputs
from gpt2lite.data import DataConfig, load_splits
from gpt2lite.experiment import build_task, load_base_model, run_method, virtual_tokens
from gpt2lite.generate import GenerationConfig
from gpt2lite.peft import MethodConfig
from gpt2lite.report import write_report
from gpt2lite.seed import seed_everything
from gpt2lite.train import TrainConfig


def main(train_file: str, output_dir: str, model: str = "gpt2", max_steps=None):
    data = DataConfig(task="summarization", train=train_file)  # one file: 80 / 10 / 10 split, seeded
    method = MethodConfig(name="lora", rank=8, alpha=16, dropout=0.05)
    config = TrainConfig(output_dir=output_dir, lr=1e-3, epochs=1, max_steps=max_steps, eval_every=100)
    seed_everything(config.seed)  # before any model is built: the run repeats bit for bit
    splits = load_splits(data)
    base = load_base_model(model, allow_random_init=False)
    context = base.model.config.n_positions - virtual_tokens(method)
    task = build_task(data, splits, Tokenizer(), context, GenerationConfig(max_new_tokens=64))
    result = run_method("lora", method, base, task, config)
    reference = os.path.abspath(model) if os.path.isdir(model) else model
    save_outputs(result.model, method, result.predictions, output_dir, reference)  # adapter/, predictions.jsonl
    paths = write_report([result.row], output_dir, task.kind, title="LoRA", notes=[splits.description])
    print(open(paths["md"]).read())
    return result


if __name__ == "__main__":
    main(*sys.argv[1:3])
