"""Launching: SLURM submission through submitit (submit.py) and the stop/requeue protocol (preemption.py)."""
