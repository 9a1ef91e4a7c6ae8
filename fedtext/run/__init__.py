"""Running experiments: the round loop, the one evaluation, run state and recording, training
runs, plots and the tutorial."""
