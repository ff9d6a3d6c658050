"""Training machinery: distributed set-up, optimiser and schedule, checkpoints, the trainer."""
