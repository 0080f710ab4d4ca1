"""``spec-evaluate``: score heuristics, baselines and trained predictors on a workdir's traces, then replay their
predictions in the prefetch-cache simulator (``eval/simulation.csv``).

spec-evaluate workdir=outputs/default
spec-evaluate experiment=smoke eval.max_lookahead=2 eval.prefetch_budget=1
spec-evaluate workdir=outputs/switch-base-8 eval.stack=encoder
spec-evaluate hardware=h100 target=mixtral_8x7b sim.cache_fractions=[0.25,0.5]
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from speculation.cli import one_line_errors, run_console
from speculation.config import CONF_DIR
from speculation.stages.job import hydra_job


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate")
@one_line_errors
@hydra_job
def main(cfg: DictConfig) -> None:
    from speculation.stages.evaluate import evaluate  # here, so --help and tab completion never import torch

    evaluate(cfg)


def cli() -> None:
    """The console script: user errors as one line on stderr (speculation/cli.py)."""
    run_console(main)


if __name__ == "__main__":
    cli()
