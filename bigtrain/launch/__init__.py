"""Launching: SLURM submission through submitit (submit.py: the login-node side; job.py: what runs on the
compute nodes). The stop/requeue protocol the job relies on belongs to the training loop (bigtrain/train/stop.py)."""
