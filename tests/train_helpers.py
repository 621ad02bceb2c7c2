"""Tiny models and datasets shared by the training-loop tests (test_train, test_resume, test_ddp)."""

import functools

import torch

from gpt2lite import GPT2, GPT2Config
from gpt2lite.loss import IGNORE_INDEX
from gpt2lite.tasks.batching import collate

VOCAB = 96
collate_lm = functools.partial(collate, pad_id=0)


def tiny_config(dropout: float = 0.0, **overrides) -> GPT2Config:
    """2 layers, 64 wide, a 96-token vocabulary: fast enough for hundreds of CPU steps."""
    return GPT2Config.from_name("tiny").replace(vocab_size=VOCAB, n_positions=64, embd_pdrop=dropout,
                                                attn_pdrop=dropout, resid_pdrop=dropout, **overrides)


def tiny_model(seed: int = 0, dropout: float = 0.0) -> GPT2:
    torch.manual_seed(seed)
    return GPT2(tiny_config(dropout))


def lm_examples(n: int, seed: int = 0) -> list:
    """Random token sequences of varied lengths whose first tokens are an unlabelled "prompt", so that
    every example carries a different number of label tokens."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = 6 + (5 * i) % 11
        prompt = 1 + (3 * i) % 4
        ids = torch.randint(1, VOCAB, (length,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return rows


def pattern_examples(n: int, length: int = 24) -> list:
    """A learnable corpus: cycles through 6 tokens with strides 1 or 2 (next token predictable from the
    previous two), every position labelled."""
    rows = []
    for i in range(n):
        stride, start = 1 + i % 2, i % 6
        ids = [10 + (start + stride * t) % 6 for t in range(length)]
        rows.append({"input_ids": ids, "labels": list(ids)})
    return rows


def ddp_config(output_dir, batch_size: int, grad_accum: int):
    """The run test_ddp compares: 2 steps over 8 examples (one epoch each), evaluation after each step."""
    from gpt2lite.training.config import TrainConfig

    return TrainConfig(output_dir=str(output_dir), lr=1e-2, batch_size=batch_size, grad_accum=grad_accum,
                       epochs=None, max_steps=2, clip=1.0, eval_every=1, progress_bar=False)


def resume_config(output_dir, **overrides):
    """The run the resume tests interrupt: 10 examples in micro-batches of 2, 2 per step, so 3 steps an
    epoch (the last one a single micro-batch); 8 steps, evaluation every 2, a checkpoint every 3."""
    from gpt2lite.training.config import TrainConfig

    return TrainConfig(**{**dict(output_dir=str(output_dir), lr=3e-3, batch_size=2, grad_accum=2, epochs=None,
                                 max_steps=8, warmup_steps=2, eval_every=2, save_every=3, clip=0.5,
                                 progress_bar=False, seed=3), **overrides})


class Crash(Exception):
    pass


def crash_at(step):
    """An on_log callback that kills the run when step `step` is logged (after its update, before any save)."""
    def on_log(record):
        if record["type"] == "train" and record["step"] == step:
            raise Crash(f"simulated crash at step {step}")
    return on_log
