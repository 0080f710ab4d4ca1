"""``spec-pipeline``: every stage in order on one workdir (collect, train each predictor kind, evaluate), ending in
``${workdir}/eval/report.md``.

spec-pipeline                               # the embedded default, into outputs/default
spec-pipeline experiment=smoke              # tiny, under two minutes on 2 cores
spec-pipeline seed=1                        # more predictor seeds on the same traces
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from speculation.cli import one_line_errors, run_console
from speculation.config import CONF_DIR
from speculation.stages.job import hydra_job


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="pipeline")
@one_line_errors
@hydra_job
def main(cfg: DictConfig) -> None:
    from speculation.stages.pipeline import pipeline  # here, so --help and tab completion never import torch

    pipeline(cfg)


def cli() -> None:
    """The console script: user errors as one line on stderr (speculation/cli.py)."""
    run_console(main)


if __name__ == "__main__":
    cli()
