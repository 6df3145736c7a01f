"""What a run reads and writes besides data: checkpoints and metric records."""
