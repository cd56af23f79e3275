"""Launching: SLURM submission through submitit (submit.py) and the stop/requeue protocol (preemption.py)."""

EXIT_REQUEUE = 75  # EX_TEMPFAIL: the run checkpointed and stopped early; it comes back when requeued
