"""The command line's errors (issue 18 items 5 and 7): the library's own errors reach the user as one line,
`gpt2lite: error: ...`, with exit status 2 and no traceback unless --debug or GPT2LITE_DEBUG=1 asks for it;
unexpected exceptions keep their traceback; every `--flag` that a message of the library names is a real flag."""

import ast
import json
import os
import re
import subprocess
import sys

import pytest

import gpt2lite.cli.pipeline
from conftest import REPO_ROOT
from gpt2lite.cli import main
from gpt2lite.cli.parser import DASHED_FLAGS, build_parser

pytestmark = pytest.mark.usefixtures("hub_offline")
PACKAGE = REPO_ROOT / "gpt2lite"
FLAG = re.compile(r"(?<![\w-])--[A-Za-z][\w-]*(?:\.[A-Za-z_][\w-]*)*")
# flags of other programs, named in the library's text beside the program's name
OTHER_PROGRAMS = {"--nproc_per_node": "torchrun", "--nnodes": "torchrun", "--logdir": "tensorboard"}


def write_rows(path, n: int = 12):
    path.write_text("".join(json.dumps({"document": f"text {i} about shares", "summary": "shares"}) + "\n"
                            for i in range(n)))
    return path


def finetune_args(model, data, out, *extra):
    return ["finetune", "--model", str(model), "--data.train", str(data), "--train.output_dir", str(out),
            "--train.max_steps", "1", "--train.progress_bar", "false", *extra]


def error_lines(text: str):
    return [line for line in text.splitlines() if line.startswith("gpt2lite: error:")]


def assert_one_message(code, err, *expected):
    assert code == 2
    assert "Traceback" not in err, err
    (line,) = error_lines(err)
    for part in expected:
        assert part in line, line
    return line


@pytest.fixture
def data(tmp_path):
    return write_rows(tmp_path / "news.jsonl")


def test_a_file_without_the_named_column_is_one_line_naming_the_real_flags(tmp_path, data, tiny_hf_dir, capsys):
    code = main(finetune_args(tiny_hf_dir, data, tmp_path / "run", "--data.input_column", "article"))
    line = assert_one_message(code, capsys.readouterr().err, "no column 'article'", "['document', 'summary']",
                              "--data.input_column", "--data.target_column")
    assert "--source-column" not in line


def test_a_model_path_that_does_not_exist_is_one_line(tmp_path, data, capsys):
    code = main(finetune_args(tmp_path / "no_such_model", data, tmp_path / "run"))
    assert_one_message(code, capsys.readouterr().err, "no directory", "no_such_model")


def test_rank_0_is_one_line_also_inside_compare_runs(tmp_path, data, tiny_hf_dir, capsys):
    code = main(finetune_args(tiny_hf_dir, data, tmp_path / "run", "--method.rank", "0"))
    assert_one_message(code, capsys.readouterr().err, "rank must be a positive integer, got 0")
    # jsonargparse wraps an error raised while it builds a Run's MethodConfig in its own ValueError
    code = main(["compare", "--model", str(tiny_hf_dir), "--data.train", str(data), "--runs",
                 '[{"method": {"name": "lora", "rank": 0}}]', "--train.output_dir", str(tmp_path / "compare")])
    assert_one_message(code, capsys.readouterr().err, "method 'lora': rank must be a positive integer, got 0")


def test_debug_shows_the_traceback_as_well(tmp_path, data, tiny_hf_dir, capsys, monkeypatch):
    code = main(finetune_args(tiny_hf_dir, data, tmp_path / "run", "--method.rank", "0", "--debug"))
    err = capsys.readouterr().err
    assert code == 2 and "Traceback (most recent call last)" in err and "check_values" in err
    assert len(error_lines(err)) == 1
    monkeypatch.setenv("GPT2LITE_DEBUG", "1")
    code = main(finetune_args(tmp_path / "no_such_model", data, tmp_path / "run"))
    err = capsys.readouterr().err
    assert code == 2 and "Traceback (most recent call last)" in err and "CheckpointError" in err


def test_an_unexpected_error_keeps_its_traceback(tmp_path, data, tiny_hf_dir, monkeypatch):
    """A ValueError that gpt2lite did not raise itself (here: from outside the package) is not a message."""
    def broken(*args, **kwargs):
        raise ValueError("something inside went wrong")

    monkeypatch.setattr(gpt2lite.cli.pipeline, "prepare", broken)
    with pytest.raises(ValueError, match="something inside went wrong"):
        main(finetune_args(tiny_hf_dir, data, tmp_path / "run"))
    monkeypatch.setattr(gpt2lite.cli.pipeline, "prepare", lambda *args, **kwargs: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        main(finetune_args(tiny_hf_dir, data, tmp_path / "run"))


def test_the_console_command_exits_2_with_one_line_and_shows_unexpected_tracebacks(tmp_path, data):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "GPT2LITE_DEBUG": ""}
    command = [sys.executable, "-m", "gpt2lite", *finetune_args(tmp_path / "nothing", data, tmp_path / "run",
                                                                 "--method.rank", "0")]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == "gpt2lite: error: method 'lora': rank must be a positive integer, got 0"
    crash = "import gpt2lite.cli.pipeline as p, sys; p.prepare = lambda *a, **k: 1 / 0; from gpt2lite.cli import main\n" \
            "sys.exit(main(sys.argv[1:]))"
    result = subprocess.run([sys.executable, "-c", crash, *finetune_args(tmp_path / "nothing", data, tmp_path / "r")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 1 and "Traceback" in result.stderr and "ZeroDivisionError" in result.stderr


def message_flags():
    """{flag: [file:line, ...]} for every --flag in a string literal of the library that is not a docstring."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and node.body and isinstance(node.body[0], ast.Expr)
                      and isinstance(node.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                for flag in FLAG.findall(node.value):
                    program = OTHER_PROGRAMS.get(flag)
                    if program is None or program not in node.value:
                        found.setdefault(flag, []).append(f"{path.relative_to(REPO_ROOT)}:{node.lineno}")
    return found


def parser_flags():
    parser = build_parser()
    flags = {option for action in parser._actions for option in action.option_strings}
    for sub in parser.commands.values():
        flags |= {option for action in sub._actions for option in action.option_strings}
    return flags | set(DASHED_FLAGS)  # estimate's --memory-budget: also taken spelt with a dash


def test_every_flag_a_message_names_is_a_real_flag():
    found, real = message_flags(), parser_flags()
    assert {"--data.input_column", "--data.target_column", "--data.train", "--adapter"} <= set(found)
    unknown = {flag: where for flag, where in found.items() if flag not in real}
    assert not unknown, f"messages name flags that no subcommand has: {unknown}"


def test_the_flag_check_catches_a_made_up_flag():
    assert FLAG.findall("Choose others (e.g. --source-column/--target-column).") == ["--source-column",
                                                                                    "--target-column"]
    assert FLAG.findall("give --data.train FILE, or --config.") == ["--data.train", "--config"]
    assert not {"--source-column", "--target-column"} & parser_flags()
