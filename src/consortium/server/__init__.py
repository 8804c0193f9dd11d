"""The server side: the round loop, sampling, evaluation, checkpoints and baselines."""
