"""What every study shares: the run folder and its atomic writes, checkpoints on disk,
interrupt handling, JSON encoding and number formatting for reports."""
