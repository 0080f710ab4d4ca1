"""One-line validation helpers shared by the config schemas: each failure names the key, the value and the fix."""

from __future__ import annotations


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def positive(name: str, value: float, fix: str = "") -> None:
    require(value > 0, f"{name}={value} must be > 0.{' ' + fix if fix else ''}")
