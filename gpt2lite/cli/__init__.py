"""The `gpt2lite` command line (also `python -m gpt2lite`): finetune, compare, evaluate, generate, merge,
estimate.

    gpt2lite finetune --config recipes/demo.yaml
    gpt2lite finetune --data.train my.jsonl --data.input_column document --data.target_column summary \\
        --method.name lora --method.rank 16 --train.epochs 3 --train.output_dir runs/mine
    gpt2lite generate --adapter runs/mine/adapter --prompts new_articles.jsonl --generation.num_beams 4

Every option is a field of a dataclass (DataConfig, MethodConfig, TrainConfig, GenerationConfig,
SearchConfig) turned into a flag by jsonargparse; `--config FILE.yaml` reads the same options from YAML and
later flags override it. Only this package imports jsonargparse and PyYAML; the library works without them.
"""

__all__ = ["run", "main"]


def run(argv=None):
    """Parse argv (default sys.argv[1:]) and run the subcommand; returns what the subcommand returns."""
    from gpt2lite.cli.parser import run as run_parsed

    return run_parsed(argv)


def main(argv=None) -> int:
    """The console script: run the subcommand; exit status 0, or 2 with one message line for the library's own
    errors (DataError, CheckpointError, invalid settings; the traceback with --debug or GPT2LITE_DEBUG=1)."""
    import sys

    from gpt2lite.cli.user_errors import report_errors

    return report_errors(run, sys.argv[1:] if argv is None else list(argv))
