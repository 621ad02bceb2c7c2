"""Issue 18's before/after figures for items 1 and 2, measured on one checkout (run it once per tree).

    python benchmarks/issue18_before_after.py --tree /path/to/old/checkout --out old.json
    python benchmarks/issue18_before_after.py --tree . --out new.json

Item 1: `gpt2lite evaluate` on a WikiText-2 .raw slice (../shared/data) with a saved random-init transformers
GPT-2, against the Hugging Face perplexity guide's sliding window run by transformers on the file's exact text:
scored tokens and perplexity of each. Item 2: the largest |loss difference| in log.jsonl between two processes
of one `gpt2lite finetune` command, and between a run killed (SIGKILL after step 5) and resumed and the
uninterrupted one. The tree's gpt2lite runs in child processes (PYTHONPATH=tree); transformers comes from this
interpreter. The model is random-init: its perplexity says nothing about GPT-2, only whether two methods agree.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
WIKITEXT = os.path.join(REPO, "..", "shared", "data", "wikitext-2-raw-v1")
WINDOW, STRIDE, STEPS = 256, 128, 6
KILL_WORKER = """
import os, signal, sys
import gpt2lite.training.run
from gpt2lite.cli import run
log = gpt2lite.training.run.Run.log
def log_then_die(self, record):
    log(self, record)
    if record["type"] == "train" and record["step"] == int(sys.argv[1]):
        os.kill(os.getpid(), signal.SIGKILL)
gpt2lite.training.run.Run.log = log_then_die
run(sys.argv[2:])
"""


def gpt2lite(tree: str, args, work: str, kill_after=None):
    env = {**os.environ, "PYTHONPATH": os.path.abspath(tree), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": os.path.join(work, "datasets_cache")}
    program = ["-c", KILL_WORKER, str(kill_after)] if kill_after else ["-m", "gpt2lite"]
    return subprocess.run([sys.executable, *program, *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=1200, cwd=work)


def save_random_gpt2(directory: str):
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=1024)
    transformers.GPT2LMHeadModel(config).save_pretrained(directory)
    return directory


def head_lines(path: str, n: int) -> str:
    with open(path, encoding="utf-8", newline="") as f:
        return "".join(line for _, line in zip(range(n), f))


def guide_perplexity(model_dir: str, text: str):
    """(scored tokens, perplexity): the HF guide "Perplexity of fixed-length models" on `text`."""
    import torch
    import transformers

    sys.path.insert(0, os.path.abspath(REPO))
    from gpt2lite.hub.tokenizer_files import save_tokenizer_files

    tokenizer_dir = tempfile.mkdtemp()
    save_tokenizer_files(tokenizer_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    model = transformers.GPT2LMHeadModel.from_pretrained(model_dir).eval()
    input_ids = tokenizer(text, return_tensors="pt").input_ids
    seq_len, nll_sum, n_tokens, prev_end = input_ids.size(1), 0.0, 0, 0
    with torch.no_grad():
        for begin in range(0, seq_len, STRIDE):
            end = min(begin + WINDOW, seq_len)
            ids = input_ids[:, begin:end]
            targets = ids.clone()
            targets[:, :-(end - prev_end)] = -100
            counted = int((targets[:, 1:] != -100).sum())
            nll_sum += float(model(ids, labels=targets).loss) * counted
            n_tokens, prev_end = n_tokens + counted, end
            if end == seq_len:
                break
    return {"file_tokens": seq_len, "scored_tokens": n_tokens, "perplexity": math.exp(nll_sum / n_tokens)}


def item1(tree: str, work: str, model_dir: str, lines: int) -> dict:
    files = {}
    for split, source in (("train", "wiki.train.partial.raw"), ("validation", "wiki.valid.raw"),
                          ("test", "wiki.test.raw")):
        files[split] = os.path.join(work, f"{split}.raw")
        with open(files[split], "w", encoding="utf-8", newline="") as f:
            f.write(head_lines(os.path.join(WIKITEXT, source), lines))
    out = os.path.join(work, "evaluation")
    result = gpt2lite(tree, ["evaluate", "--model", model_dir, "--data.task", "language_modeling",
                             "--data.train", files["train"], "--data.validation", files["validation"],
                             "--data.test", files["test"], "--data.max_length", WINDOW, "--data.stride", STRIDE,
                             "--generation.max_new_tokens", 1, "--output_dir", out],
                      work)
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])
    row = json.load(open(os.path.join(out, "report.json")))["rows"][0]
    with open(files["test"], "rb") as f:
        guide = guide_perplexity(model_dir, f.read().decode("utf-8"))
    return {"lines": lines, "gpt2lite_tokens": row["perplexity_tokens"], "gpt2lite_perplexity": row["perplexity"],
            "guide": guide}


def finetune_command(model_dir: str, data: str, out: str, *extra):
    return ["finetune", "--model", model_dir, "--data.task", "summarization", "--data.train", data,
            "--data.input_column", "document", "--data.target_column", "summary", "--method.name", "lora",
            "--method.rank", 4, "--method.dropout", 0.1, "--train.output_dir", out, "--train.lr", 1e-2,
            "--train.batch_size", 4, "--train.max_steps", STEPS, "--train.save_every", 2, "--train.eval_every", 3,
            "--train.seed", 3, "--train.progress_bar", "false", "--generation.max_new_tokens", 4, *extra]


def losses(out: str):
    return [(r["type"], r["step"], r.get("loss", r.get("val_loss"))) for r in map(json.loads, open(f"{out}/log.jsonl"))]


def max_difference(a: str, b: str) -> float:
    pairs = list(zip(losses(a), losses(b)))
    assert all(x[:2] == y[:2] for x, y in pairs), (losses(a), losses(b))
    return max(abs(x[2] - y[2]) for x, y in pairs)


def item2(tree: str, work: str, model_dir: str) -> dict:
    import random

    random.seed(0)
    words = "shares rose sharply after the company reported strong earnings while analysts expected growth".split()
    data = os.path.join(work, "data.jsonl")
    with open(data, "w") as f:
        for _ in range(40):
            text = [random.choice(words) for _ in range(16)]
            f.write(json.dumps({"document": " ".join(text) + ".", "summary": " ".join(text[:5])}) + "\n")
    runs = {name: os.path.join(work, name) for name in ("a", "b", "killed")}
    for name in ("a", "b"):
        result = gpt2lite(tree, finetune_command(model_dir, data, runs[name]), work)
        assert result.returncode == 0, result.stderr[-3000:]
    killed = gpt2lite(tree, finetune_command(model_dir, data, runs["killed"]), work, kill_after=5)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = gpt2lite(tree, finetune_command(model_dir, data, runs["killed"], "--train.resume_from",
                                              os.path.join(runs["killed"], "checkpoint.pt")), work)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return {"steps": STEPS, "two_processes_max_loss_diff": max_difference(runs["a"], runs["b"]),
            "resumed_vs_uninterrupted_max_loss_diff": max_difference(runs["a"], runs["killed"])}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", default=REPO, help="the checkout whose gpt2lite is measured")
    parser.add_argument("--out", help="write the figures here as JSON")
    parser.add_argument("--lines", type=int, default=40, help="lines of each WikiText file in the slice")
    parser.add_argument("--items", type=int, nargs="+", default=[1, 2], choices=[1, 2], help="which items to measure")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="issue18_")
    model_dir = save_random_gpt2(os.path.join(work, "random_gpt2"))
    figures = {"tree": os.path.abspath(args.tree)}
    if 1 in args.items:
        figures["item1"] = item1(args.tree, work, model_dir, args.lines)
    if 2 in args.items:
        figures["item2"] = item2(args.tree, work, model_dir)
    text = json.dumps(figures, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
