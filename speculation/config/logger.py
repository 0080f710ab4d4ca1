"""Schema of experiment tracking: ``conf/logger/``."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from speculation.config.checks import require


class LoggerBackend(StrEnum):
    wandb = "wandb"
    none = "none"


@dataclass
class LoggerConfig:
    """Experiment tracking. W&B runs offline unless ``mode=online``; ``logger=none`` turns it off."""

    backend: LoggerBackend = LoggerBackend.wandb
    project: str = "moe-speculation"
    entity: str | None = None
    mode: str = "offline"  # offline | online | disabled
    group: str | None = None  # defaults to the experiment name
    tags: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        require(
            self.mode in ("offline", "online", "disabled"),
            f"logger.mode={self.mode!r} is not one of offline, online, disabled.",
        )
