"""The training loop and what it needs: loop, run (setup, Run), state, config (TrainConfig), evaluation, optim,
precision, distributed, loggers, memory, checkpoint."""
