"""The fast tier: pure functions of the package, in seconds, in this process (no subprocess, no process group,
no SLURM). `pytest tests/fast` runs it alone (under 30 s on 2 cores)."""
