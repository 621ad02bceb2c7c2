"""The runs test_fsdp compares, shared by the test and its torchrun worker (fsdp_train_worker.py)."""

from gpt2lite.peft.methods import apply
from gpt2lite.training.config import TrainConfig
from train_helpers import tiny_model

# method -> apply()'s settings; full fine-tuning also checkpoints activations
CASES = {
    "full": {"name": "full"},
    "lora": {"name": "lora", "rank": 4, "targets": ["c_attn", "c_fc"]},
    "qlora": {"name": "qlora", "rank": 4, "targets": ["c_attn", "c_fc"]},
    "prompt": {"name": "prompt", "n_tokens": 3},
    "last_n": {"name": "last_n", "n_layers": 1},
}


def case_model(method: str):
    model = tiny_model(0)
    apply(model, CASES[method])
    return model


def case_config(output_dir, method: str, strategy: str = "ddp", processes: int = 2, **overrides):
    """4 steps of 8 examples: 2 processes x 2 micro-batches x 2 examples, or one process x 1 x 8; evaluation
    every 2 steps one example at a time (3 examples: the ranks run 2 and 1 batches), the best restored."""
    per_process = dict(batch_size=2, grad_accum=2) if processes == 2 else dict(batch_size=8, grad_accum=1)
    return TrainConfig(**{**dict(output_dir=str(output_dir), lr=1e-2, epochs=None, max_steps=4, clip=0.5,
                                 eval_every=2, eval_batch_size=1, save_every=2, progress_bar=False,
                                 strategy=strategy, activation_checkpointing=method == "full"),
                          **per_process, **overrides})
