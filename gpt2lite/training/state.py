"""`TrainState`: everything the training loop counts, saved in checkpoint.pt as a plain dict and rebuilt on resume.

With the weights, optimizer, scheduler, scaler and RNG states (checkpoint.py) it is all a resumed run needs to
continue exactly: the step, the data position (epoch, micro-batch within it), early stopping, timings, the
loss history and the sums since the last log record.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional


@dataclass
class Interval:
    """Sums over the steps since the last train record of log.jsonl."""

    loss: float = 0.0  # loss x label tokens, over the steps with a finite loss
    tokens: int = 0  # label tokens of those steps
    input_tokens: int = 0  # input tokens of every step (for tokens_per_s)
    time: float = 0.0  # seconds spent in those steps


@dataclass
class TrainState:
    """The training loop's counters; to_dict() gives plain numbers, lists and dicts (checkpoint.pt loads with
    torch.load(weights_only=True)), from_dict() rebuilds the state on resume."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of this epoch consumed
    best_val_loss: float = math.inf
    best_step: Optional[int] = None  # the step of best_val_loss; None before the first evaluation
    evals_without_improvement: int = 0  # early stopping counts these
    skipped_steps: int = 0  # steps whose update nan_policy="skip" dropped
    elapsed_s: float = 0.0  # wall time of the run, over all its resumptions
    step_time_s: float = 0.0  # time inside steps (no evaluation or saving): the denominator of tokens_per_s
    tokens: int = 0  # input tokens trained on
    best_train_loss: float = math.inf  # the lowest finite loss of a train record
    history: dict = field(default_factory=lambda: {"train": [], "val": []})  # [[step, loss], ...] each
    interval: Interval = field(default_factory=Interval)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: dict) -> "TrainState":
        """Rebuild a state from `to_dict` (or from a checkpoint whose history still listed the logged losses)."""
        saved, history = dict(saved), dict(saved["history"])
        logged = history.pop("logged", None)
        if logged is not None:
            saved.setdefault("best_train_loss", min((loss for _, loss in logged if math.isfinite(loss)),
                                                    default=math.inf))
        return cls(**{**saved, "history": history, "interval": Interval(**saved["interval"])})

    def end_step(self, micro_batches: int, loss_sum: float, tokens: int, input_tokens: int, step_time: float):
        """Count one optimizer step over `micro_batches` micro-batches with `tokens` label tokens."""
        self.step += 1
        self.batch_in_epoch += micro_batches
        self.step_time_s += step_time
        self.tokens += input_tokens
        loss = loss_sum / max(tokens, 1)
        self.history["train"].append([self.step, loss])
        if math.isfinite(loss):
            self.interval.loss += loss_sum
            self.interval.tokens += tokens
        self.interval.input_tokens += input_tokens
        self.interval.time += step_time

    def train_record(self, lr: float, grad_norm: float, memory_mb: float) -> dict:
        """The log record of the steps since the last one (their token-mean loss); starts the next interval."""
        interval = self.interval
        loss = interval.loss / max(interval.tokens, 1) if interval.tokens else float("nan")
        if math.isfinite(loss):
            self.best_train_loss = min(self.best_train_loss, loss)
        self.interval = Interval()
        return {"type": "train", "step": self.step, "epoch": self.epoch, "loss": loss, "lr": lr,
                "grad_norm": grad_norm, "tokens_per_s": interval.input_tokens / max(interval.time, 1e-9),
                "elapsed_s": self.elapsed_s, "memory_mb": memory_mb}

    def end_evaluation(self, val_loss: float) -> bool:
        """Count an evaluation at this step; return whether it improved on the best validation loss."""
        self.history["val"].append([self.step, val_loss])
        improved = val_loss < self.best_val_loss
        if improved:
            self.best_val_loss, self.best_step, self.evals_without_improvement = val_loss, self.step, 0
        else:
            self.evals_without_improvement += 1
        return improved

    def next_epoch(self):
        self.epoch += 1
        self.batch_in_epoch = 0

    def final_train_loss(self):
        """(step, loss) of the last step with a finite loss, or (None, None)."""
        return next(((step, loss) for step, loss in reversed(self.history["train"]) if math.isfinite(loss)),
                    (None, None))
