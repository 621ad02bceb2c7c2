"""The training loop and what it needs: train() (loop), start_run() and the live Run (run), the counters (state),
TrainConfig (config), evaluation, optim, precision, distributed, loggers, memory, checkpoint."""

from gpt2lite.training.config import TrainConfig
from gpt2lite.training.evaluation import evaluate_loss
from gpt2lite.training.loop import train
from gpt2lite.training.state import TrainState

__all__ = ["TrainConfig", "train", "evaluate_loss", "TrainState"]
