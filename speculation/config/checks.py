"""One-line validation helpers shared by the config schemas: each failure names the key, the value and the fix."""

from __future__ import annotations

from speculation.errors import UserError


def require(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)


def check_seed(name: str, value: int) -> None:
    """numpy and torch take non-negative integer seeds."""
    require(value >= 0, f"{name}={value} must be a non-negative integer (a random seed).")


def positive(name: str, value: float, fix: str = "") -> None:
    require(value > 0, f"{name}={value} must be > 0.{' ' + fix if fix else ''}")
