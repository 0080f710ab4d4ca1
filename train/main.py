"""``spec-train``: fit one learned routing predictor on a workdir's traces.

spec-train predictor=contextual workdir=outputs/default
spec-train -m predictor=contextual,transformer,hierarchical seed=0,1,2 hydra/launcher=local
spec-train experiment=smoke predictor=hierarchical loss.consistency=0.1
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from speculation.cli import one_line_errors, run_console
from speculation.config import CONF_DIR
from speculation.stages.job import hydra_job


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
@one_line_errors
@hydra_job
def main(cfg: DictConfig) -> None:
    from speculation.stages.train import train  # here, so --help and tab completion never import torch

    train(cfg)


def cli() -> None:
    """The console script: user errors as one line on stderr (speculation/cli.py)."""
    run_console(main)


if __name__ == "__main__":
    cli()
