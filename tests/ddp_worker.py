"""A ``torchrun`` entry point for tests: ``spec-train`` with one rank killed mid-run.

``torchrun ... tests/ddp_worker.py <spec-train overrides>`` with ``KILL_RANK=r`` and
``KILL_AFTER=<run>/training_state.pt`` in the environment: rank ``r`` kills itself with SIGKILL (no cleanup, as
the OOM killer or a preempted node would) at its first batch after rank 0's first checkpoint is on disk. torchrun
then stops the other ranks, as it does when any rank dies. Without ``KILL_RANK`` it is plain ``spec-train``.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import train.main
from speculation.predictors import training


def main() -> None:
    if os.environ.get("KILL_RANK") is not None and os.environ.get("RANK") == os.environ["KILL_RANK"]:
        checkpoint = Path(os.environ["KILL_AFTER"])
        real_batch = training.WindowSource.batch

        def batch(self: training.WindowSource, indices):
            if checkpoint.exists():
                os.kill(os.getpid(), signal.SIGKILL)
            return real_batch(self, indices)

        training.WindowSource.batch = batch
    sys.argv = ["spec-train", *sys.argv[1:]]
    train.main.cli()


if __name__ == "__main__":
    main()
