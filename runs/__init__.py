"""reslab's training side: data, one training run, tracking and checkpoints."""
