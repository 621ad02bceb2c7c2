"""LoRA fine-tuning of GPT-2 for summarization, step by step: the library's main job as one script to read.

    python examples/lora_summarize.py              # GPT-2 (124M) on CNN/DailyMail; offline: see below
    python examples/lora_summarize.py --help       # every setting, with its default
    python examples/lora_summarize.py --data.train my.jsonl --data.input_column document \
        --data.target_column summary --method.rank 16 --train.max_steps 500 --train.output_dir runs/mine

The steps, in order: load the base model, add LoRA, build the summarization task, train, evaluate ROUGE on
the test split, save the adapter in peft's format, then load it back and summarize a few test articles.
(`gpt2lite.experiment.run_method` does steps 2, 4 and 5 in one call; the command line is built on it.)
The settings are the library's own dataclasses (DataConfig, MethodConfig, TrainConfig, GenerationConfig):
edit them below, or override any field from the command line (jsonargparse makes main's parameters flags,
named as in `gpt2lite finetune`; `--config my.yaml` reads them from YAML).

Offline (no Hugging Face Hub), as `make demo` does, it says so, pretrains a small GPT-2 of its own on the
Python standard library's docstrings (a few minutes the first time, then cached) and fine-tunes it on a
summarization task built from other docstrings (summary line = target). Those figures show that LoRA
works; they are not GPT-2 results.
"""

import json
import os

from gpt2lite import (GPT2, DataConfig, GenerationConfig, Tokenizer, TrainConfig, build_task, count_parameters,
                      load_splits, peft, seed_everything)
from gpt2lite import train as train_loop
from gpt2lite.experiment import PretrainConfig, load_base_model, method_row, write_report
from gpt2lite.tasks import DEFAULT_TEMPLATE, build_generation_prompts, generate_texts

# -- settings: recipes/demo.yaml's LoRA run; each field is a flag (--model, --data.train, --method.rank, ...) --
MODEL = "gpt2"  # a hub id or a checkpoint directory
DATA = DataConfig(task="summarization", dataset="cnn_dailymail", dataset_config="3.0.0",  # or train="my.jsonl"
                  max_length=256, max_train_samples=2000, max_validation_samples=100, max_test_samples=50)
METHOD = peft.MethodConfig(name="lora", rank=8, alpha=16.0, dropout=0.05, targets=("c_attn", "c_proj", "c_fc"))
TRAIN = TrainConfig(output_dir="runs/lora_summarize", lr=3e-3, batch_size=8, epochs=None, max_steps=100,
                    warmup_steps=10, schedule="cosine", eval_every=25)
GENERATION = GenerationConfig(max_new_tokens=24)
PRETRAIN = PretrainConfig()  # offline only: the small base pretrained on docstrings (450 steps, then cached)


def main(model: str = MODEL, data: DataConfig = DATA, method: peft.MethodConfig = METHOD,
         train: TrainConfig = TRAIN, generation: GenerationConfig = GENERATION, fallback: bool = True, pretrain: PretrainConfig = PRETRAIN,
         show: int = 3) -> dict:
    """Fine-tune LoRA for summarization, score it, save the adapter and summarize a few test articles.

    Args:
        model: the base model: a hub id (gpt2, gpt2-medium, ...) or a checkpoint directory.
        data: the summarization data: --data.train FILE (with its input/target columns) or a hub dataset.
        method: LoRA's settings (rank, alpha, dropout, targets; --method.name qlora: on a 4-bit base).
        train: the training run; the adapter, report and predictions go to train.output_dir.
        generation: how summaries are generated (greedy, at most max_new_tokens).
        fallback: offline, use a small model pretrained here and the docstring task (the output says so).
        pretrain: how that offline model is pretrained (the first run only; later runs load it from the cache).
        show: how many test articles to summarize at the end with the reloaded adapter.
    """
    if method.name not in ("lora", "qlora") or data.task != "summarization":
        raise SystemExit(f"this script is LoRA (--method.name lora or qlora) for summarization, not {method.name} "
                         f"for {data.task}: use gpt2lite finetune --method.name {method.name} --data.task {data.task}")
    output_dir = os.path.abspath(train.output_dir)

    # 1. The base model: pretrained weights or, offline with fallback, a small model pretrained here
    base = load_base_model(model, allow_random_init=fallback, seed=train.seed,
                           fallback_pretrain=pretrain if fallback else None)
    print(f"model: {base.description}")
    base_dir = os.path.abspath(model) if os.path.isdir(model) else model  # what the adapter will name as its base
    if base.kind != "pretrained":  # a fallback has no name: write it beside the adapter
        base_dir = os.path.join(output_dir, "base_model")
        base.model.save_pretrained(base_dir)

    # 2. LoRA: low-rank A, B beside the targeted weights (B = 0, so the model is unchanged); only they train.
    # A is drawn from torch's generator, seeded from the run's seed right here, whatever ran before (a first
    # offline run pretrains the base): the same settings give the same run
    seed_everything(train.seed)
    peft.apply(base.model, method)
    trainable, total = count_parameters(base.model)
    print(f"{method.name}: rank {method.rank}, alpha {method.alpha:g} on {', '.join(method.targets or ['c_attn'])}: "
          f"{trainable:,} of {total:,} parameters train ({100 * trainable / total:.2f}%)")

    # 3. The task: "{article}\nTL;DR: {summary}" examples, the loss on the summary's tokens only
    splits = load_splits(data, allow_fallback=fallback)
    context = min(data.max_length or base.model.config.n_positions, base.model.config.n_positions)
    tokenizer = Tokenizer()
    task = build_task(data, splits, tokenizer, context, generation)
    print(f"data: {splits.description}\nexamples: {len(task.train)} train, {len(task.validation)} validation, "
          f"{task.test_size} test")

    # 4. Train (AdamW, warmup + schedule, validation loss every eval_every steps, best weights kept)
    stats = train_loop(base.model, task.train, train, eval_dataset=task.validation)  # losses, steps, time, memory

    # 5. Evaluate: generate a summary of every test article, ROUGE against the references
    scores, predictions = task.evaluate(base.model)
    print("test ROUGE-1 / 2 / L / Lsum: " + " / ".join(f"{scores[k]:.2f}" for k in
                                                          ("rouge1", "rouge2", "rougeL", "rougeLsum")))
    row = method_row(method.name, stats, base.model, scores, random_init=base.random_init, base_kind=base.kind)
    write_report([row], output_dir, "summarization", title="LoRA summarization",
                 random_init=base.random_init, notes=[f"model: {base.description}", f"data: {splits.description}"])
    with open(os.path.join(output_dir, "predictions.jsonl"), "w") as f:
        f.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions)

    # 6. Save the adapter in peft's format (peft.PeftModel.from_pretrained(base, adapter_dir) loads it too)
    adapter_dir = os.path.join(output_dir, "adapter")
    peft.save_adapter(base.model, adapter_dir, base_model_name_or_path=base_dir)
    print(f"adapter: {adapter_dir} (base: {base_dir}); report, predictions.jsonl: {output_dir}")

    # 7. Later, anywhere: the base + the saved adapter, summarizing a few test articles
    reloaded = peft.load_adapter(GPT2.from_pretrained(base_dir), adapter_dir).eval()
    shown, texts = predictions[:show], []
    if shown:
        prompts = build_generation_prompts(shown, tokenizer, "source", "reference",
                                           data.template or DEFAULT_TEMPLATE, context, generation.max_new_tokens)
        texts = generate_texts(reloaded, [p["input_ids"] for p in prompts.rows], tokenizer, generation)
    for number, (example, text) in enumerate(zip(shown, texts), 1):
        print(f"\n--- test article {number}: {' '.join(example['source'].split())[:300]}\n"
              f"reference: {example['reference']}\ngenerated: {text}")
    return {"scores": scores, "train": stats, "adapter": adapter_dir, "generated": texts}


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main)
