"""``spec-collect``: train (or reload) the source MoE and record its real routing into ``workdir/traces``.

spec-collect                              # embedded Switch LM on the stdlib corpus
spec-collect experiment=smoke             # tiny, under a minute on 2 cores
spec-collect router=topk workdir=outputs/top2
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from speculation.config import CONF_DIR
from speculation.stages.collect import collect


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="collect")
def main(cfg: DictConfig) -> None:
    collect(cfg)


if __name__ == "__main__":
    main()
