"""Training: the loop, checkpoints, distributed glue, tracking and the command-line glue."""
