"""``spec-collect``: train (or reload) the source MoE and record its real routing into ``workdir/traces``.

spec-collect                              # embedded Switch LM on the stdlib corpus
spec-collect experiment=smoke             # tiny, under a minute on 2 cores
spec-collect router=topk workdir=outputs/top2
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from speculation.cli import one_line_errors, run_console
from speculation.config import CONF_DIR
from speculation.stages.job import hydra_job


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="collect")
@one_line_errors
@hydra_job
def main(cfg: DictConfig) -> None:
    from speculation.stages.collect import collect  # here, so --help and tab completion never import torch

    collect(cfg)


def cli() -> None:
    """The console script: user errors as one line on stderr (speculation/cli.py)."""
    run_console(main)


if __name__ == "__main__":
    cli()
