"""A Hydra launcher that runs each job of a sweep under ``torchrun`` on SLURM (or locally): see launcher.py."""
