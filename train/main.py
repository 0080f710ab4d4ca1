"""``spec-train``: fit one learned routing predictor on a workdir's traces.

spec-train predictor=contextual workdir=outputs/default
spec-train -m predictor=contextual,transformer,hierarchical seed=0,1,2 hydra/launcher=local
spec-train experiment=smoke predictor=hierarchical loss.consistency=0.1
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from speculation.config import CONF_DIR
from speculation.stages.train import train


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
