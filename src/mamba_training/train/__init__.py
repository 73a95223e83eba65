"""The training loop and what it orchestrates: optimizer, schedule, distributed setup, run records."""
