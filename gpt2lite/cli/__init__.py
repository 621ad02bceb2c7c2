"""The `gpt2lite` command line (also `python -m gpt2lite`): finetune, compare, evaluate, generate, merge.

    gpt2lite finetune --config recipes/demo.yaml
    gpt2lite finetune --data.train my.jsonl --data.input_column document --data.target_column summary \\
        --method.name lora --method.rank 16 --train.epochs 3 --train.output_dir runs/mine
    gpt2lite generate --adapter runs/mine/adapter --prompts new_articles.jsonl --generation.num_beams 4

Every option is a field of a dataclass (DataConfig, MethodConfig, TrainConfig, GenerationConfig,
SearchConfig) turned into a flag by jsonargparse; `--config FILE.yaml` reads the same options from YAML and
later flags override it. The command line needs the "cli" extra (jsonargparse, PyYAML); the library does not.
"""


def main(argv=None):
    """Parse argv (default sys.argv[1:]) and run the subcommand; returns what it returns."""
    from .parser import run

    return run(argv)
