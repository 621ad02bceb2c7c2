"""The hyperparameters and bookkeeping of one training run: `TrainConfig`, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from gpt2lite.training import loggers
from gpt2lite.training.optim import SCHEDULES
from gpt2lite.training.precision import CHOICES as PRECISION_CHOICES


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters and bookkeeping of one training run (validated on construction)."""

    output_dir: str = "out"
    # optimisation
    lr: float = 3e-4
    weight_decay: float = 0.0  # on >= 2-D weights only; never biases, norms or soft prompts
    betas: tuple = (0.9, 0.999)
    warmup_steps: int = 0
    schedule: str = "linear"  # after warmup: "linear" or "cosine" decay to 0 at the last step, or "constant"
    clip: Optional[float] = 1.0  # max global gradient norm; None or 0 disables clipping
    # data and length of the run
    batch_size: int = 8  # examples per micro-batch (per process under torchrun)
    grad_accum: int = 1  # micro-batches per optimizer step
    epochs: Optional[int] = 1  # None: run until max_steps or time_budget_s
    max_steps: Optional[int] = None  # optimizer steps; the schedule spans min(max_steps, epochs' steps)
    time_budget_s: Optional[float] = None  # stop (and save) once training has run this many seconds
    shuffle: bool = True  # without a sampler: a permutation seeded by seed + epoch
    seed: int = 0  # seeds python/numpy/torch with seed + rank (dropout) and the data order
    num_workers: int = 0  # DataLoader workers for collating
    # precision and device
    precision: str = "fp32"  # "fp32" | "bf16" (autocast, CPU or CUDA) | "fp16" (CUDA, with a GradScaler)
    #                          | "auto" (bf16 where the device has native bf16 arithmetic, else fp32)
    device: Optional[str] = None  # None: cuda:LOCAL_RANK when available, else cpu
    activation_checkpointing: bool = False  # True: model.set_activation_checkpointing(True) (less memory, ~1.3x time)
    # several processes (torchrun): "ddp" replicates the model on every rank; "fsdp" shards parameters,
    # gradients and optimizer state over the ranks (FSDP2, gpt2lite.training.fsdp), checkpoints in checkpoint-shards/
    strategy: str = "ddp"
    fsdp_reshard_after_forward: bool = True  # free each block's gathered weights after its forward (less memory)
    fsdp_cpu_offload: bool = False  # keep sharded parameters, gradients and optimizer state in CPU memory (CUDA)
    compile: bool = False  # torch.compile the training forward and backward once (dynamic batch and sequence
    #                        sizes: no recompilation per length); checks, keys and checkpoints as without it
    # evaluation, early stopping, checkpoints
    eval_every: Optional[int] = None  # evaluate every N optimizer steps
    eval_each_epoch: bool = True  # and at the end of each epoch
    eval_batch_size: Optional[int] = None  # default: batch_size
    patience: Optional[int] = None  # early stopping: evaluations without a lower val loss before stopping
    save_every: Optional[int] = None  # write checkpoint.pt every N steps (always at the end)
    save_best: bool = True  # write best.safetensors whenever the validation loss improves
    restore_best: bool = True  # load the best weights back into the model when training ends
    resume_from: Optional[str] = None  # a checkpoint.pt (or its directory) written by an earlier run
    # logging and failure handling
    log_every: int = 1  # one JSONL record per N steps (the loss is the token mean over those steps)
    progress_bar: bool = True  # tqdm on rank 0: a widget in Jupyter, text on stderr elsewhere (a file too)
    report_to: tuple = ()  # live logging of each record on rank 0: "tensorboard", "csv", "wandb", "mlflow"
    nan_policy: str = "stop"  # on a NaN/inf loss: "stop" raises FloatingPointError; "skip" skips the update

    def __post_init__(self):
        for name in ("batch_size", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("epochs", "max_steps", "eval_every", "save_every", "patience", "eval_batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"TrainConfig.{name} must be None or >= 1, got {value}")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise ValueError(f"time_budget_s must be None or > 0 seconds, got {self.time_budget_s}")
        if self.lr < 0 or self.weight_decay < 0 or self.warmup_steps < 0:
            raise ValueError("lr, weight_decay and warmup_steps must be >= 0")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.precision not in PRECISION_CHOICES:
            raise ValueError(f"precision must be one of {PRECISION_CHOICES}, got {self.precision!r}")
        object.__setattr__(self, "report_to", loggers.check_names(self.report_to))
        if not isinstance(self.compile, bool):
            raise ValueError(f"compile must be True or False, got {self.compile!r}")
        if self.strategy not in ("ddp", "fsdp"):
            raise ValueError(f"strategy must be 'ddp' or 'fsdp', got {self.strategy!r}")
        if self.strategy == "fsdp" and self.compile:
            raise ValueError("compile=True is not supported with strategy='fsdp' yet; use one or the other")
        if self.nan_policy not in ("stop", "skip"):
            raise ValueError(f"nan_policy must be 'stop' or 'skip', got {self.nan_policy!r}")
        if self.epochs is None and self.max_steps is None and self.time_budget_s is None:
            raise ValueError("nothing would end the run: set epochs, max_steps or time_budget_s")
        if self.epochs is None and self.max_steps is None and self.schedule != "constant":
            raise ValueError(f"a {self.schedule} schedule needs a known length: set epochs or max_steps, "
                             "or use schedule='constant' with a time budget alone")
