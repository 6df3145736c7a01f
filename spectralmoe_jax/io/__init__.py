"""What a run reads and writes besides data: checkpoints, metric records, the workdir lock and
config, and small files written whole (files.py)."""
